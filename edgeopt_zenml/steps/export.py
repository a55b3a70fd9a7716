from typing import Annotated

from zenml import step

from edgeopt.artifacts import Checkpoint, Dataset, ModelArtifact
from edgeopt.models.export import export_checkpoint
from edgeopt_zenml.materializers import ModelArtifactMaterializer


@step(output_materializers=ModelArtifactMaterializer)
def export(checkpoint: Checkpoint, dataset: Dataset, fmt: str, variant: str) -> Annotated[ModelArtifact, "model"]:
    """FP32 export to a format (ONNX, OpenVINO IR) with a parity check against the source model."""
    return export_checkpoint(checkpoint, fmt, dataset, variant)
