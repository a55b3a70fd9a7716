"""This project's own steps: a package named ``steps``, as in every ZenML project (edgeopt's steps live
under ``edgeopt_zenml.steps``, so the two never collide)."""

from steps.train import train_classifier

__all__ = ["train_classifier"]
