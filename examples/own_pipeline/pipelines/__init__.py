"""This project's own pipelines (a package named ``pipelines``, as in every ZenML project)."""

from pipelines.edge import edge_pipeline

__all__ = ["edge_pipeline"]
