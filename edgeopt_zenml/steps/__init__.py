"""ZenML steps: thin adapters over edgeopt/ (typing, caching, metadata, tracking)."""

from edgeopt_zenml.steps.data import load_data
from edgeopt_zenml.steps.deploy import deploy
from edgeopt_zenml.steps.evaluate import evaluate
from edgeopt_zenml.steps.export import export
from edgeopt_zenml.steps.promote import promote
from edgeopt_zenml.steps.quantize import quantize
from edgeopt_zenml.steps.select import select
from edgeopt_zenml.steps.shrink import shrink
from edgeopt_zenml.steps.track import track
from edgeopt_zenml.steps.train import distill_student, train_teacher

__all__ = [
    "deploy", "distill_student", "evaluate", "export", "load_data", "promote", "quantize", "select",
    "shrink", "track", "train_teacher",
]
