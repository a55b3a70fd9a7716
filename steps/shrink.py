from typing import Annotated

from zenml import step

from edgeopt.artifacts import Checkpoint, Dataset, ModelArtifact
from edgeopt.config import LowRankConfig, PruneConfig, QuantConfig, SparsityConfig
from edgeopt.export import export_checkpoint
from edgeopt.pruning import shrink_student
from edgeopt.quantization import quantize_model
from materializers import CheckpointMaterializer, ModelArtifactMaterializer


@step(output_materializers=CheckpointMaterializer)
def shrink(student: Checkpoint, teacher: Checkpoint, dataset: Dataset, method: str, amount: float, options: dict,
           seed: int) -> Annotated[Checkpoint, "shrunk"]:
    """Structured pruning, low-rank factorization or unstructured sparsity, then a KD fine-tune."""
    schema = {"prune": PruneConfig, "lowrank": LowRankConfig, "sparsity": SparsityConfig}[method]
    return shrink_student(student, teacher, dataset, method, amount, schema.model_validate(options), seed)


@step(output_materializers=ModelArtifactMaterializer)
def export(checkpoint: Checkpoint, dataset: Dataset, fmt: str) -> Annotated[ModelArtifact, "model"]:
    """FP32 export to ONNX or OpenVINO IR with a parity check against torch."""
    return export_checkpoint(checkpoint, fmt, dataset)


@step(output_materializers=ModelArtifactMaterializer)
def quantize(model: ModelArtifact, dataset: Dataset, scheme: str, quant: dict, seed: int) -> Annotated[ModelArtifact, "model"]:
    """FP16 or INT8 (static ORT QDQ / NNCF PTQ, dynamic, accuracy-controlled) from the FP32 export."""
    return quantize_model(model, scheme, dataset, QuantConfig.model_validate(quant), seed)
