from typing import Annotated

from zenml import step

from edgeopt.artifacts import Checkpoint, Dataset, ModelArtifact
from edgeopt.config import PruneConfig
from edgeopt.export import export_checkpoint
from edgeopt.pruning import prune_student
from edgeopt.quantization import quantize_model
from materializers import CheckpointMaterializer, ModelArtifactMaterializer


@step(output_materializers=CheckpointMaterializer)
def prune(student: Checkpoint, teacher: Checkpoint, dataset: Dataset, ratio: float, prune: dict, seed: int) -> Annotated[Checkpoint, "pruned"]:
    """Structured channel pruning (torch-pruning) + KD fine-tune."""
    return prune_student(student, teacher, dataset, ratio, PruneConfig.model_validate(prune), seed)


@step(output_materializers=ModelArtifactMaterializer)
def export(checkpoint: Checkpoint, dataset: Dataset, fmt: str) -> Annotated[ModelArtifact, "model"]:
    """FP32 export to ONNX or OpenVINO IR with a parity check against torch."""
    return export_checkpoint(checkpoint, fmt, dataset)


@step(output_materializers=ModelArtifactMaterializer)
def quantize(model: ModelArtifact, dataset: Dataset, scheme: str, calibration_samples: int, seed: int) -> Annotated[ModelArtifact, "model"]:
    """INT8 PTQ: ONNX Runtime static QDQ for ONNX, NNCF for OpenVINO IR."""
    return quantize_model(model, scheme, dataset, calibration_samples, seed)
