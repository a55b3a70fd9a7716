"""ZenML materializers for edgeopt's artifact types (folders with a manifest; JSON records)."""

from edgeopt_zenml.materializers.folder import (
    CheckpointMaterializer,
    DatasetMaterializer,
    ImageMaterializer,
    ModelArtifactMaterializer,
)
from edgeopt_zenml.materializers.records import EvaluationMaterializer, SelectionMaterializer

__all__ = [
    "CheckpointMaterializer",
    "DatasetMaterializer",
    "EvaluationMaterializer",
    "ImageMaterializer",
    "ModelArtifactMaterializer",
    "SelectionMaterializer",
]
