"""ZenML steps: thin adapters over edgeopt/ (typing, caching, metadata, tracking)."""

from steps.data import load_data
from steps.deploy import deploy
from steps.evaluate import evaluate
from steps.export import export
from steps.promote import promote
from steps.quantize import quantize
from steps.select import select
from steps.shrink import shrink
from steps.track import track
from steps.train import distill_student, train_teacher

__all__ = [
    "deploy", "distill_student", "evaluate", "export", "load_data", "promote", "quantize", "select",
    "shrink", "track", "train_teacher",
]
