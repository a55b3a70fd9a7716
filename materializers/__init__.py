"""ZenML materializers for edgeopt's artifact types (folders with a manifest; JSON records)."""

from materializers.folder import (
    CheckpointMaterializer,
    DatasetMaterializer,
    ImageMaterializer,
    ModelArtifactMaterializer,
)
from materializers.records import EvaluationMaterializer, SelectionMaterializer

__all__ = [
    "CheckpointMaterializer",
    "DatasetMaterializer",
    "EvaluationMaterializer",
    "ImageMaterializer",
    "ModelArtifactMaterializer",
    "SelectionMaterializer",
]
