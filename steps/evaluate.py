from typing import Annotated, List

from zenml import step

from edgeopt.artifacts import Checkpoint, Dataset, ModelArtifact
from edgeopt.config import TargetConfig
from edgeopt.evaluation import Evaluation, evaluate_variants
from materializers import EvaluationMaterializer


@step(enable_cache=False, output_materializers=EvaluationMaterializer)
def evaluate(
    models: List[ModelArtifact], dataset: Dataset, teacher: Checkpoint, teacher_onnx: ModelArtifact,
    runtimes: List[str], target: dict,
) -> Annotated[Evaluation, "evaluation"]:
    """Measure every variant (and the teacher) in this one process: never cached, so latencies
    are always same-run comparisons."""
    return evaluate_variants(models, runtimes, dataset, teacher, teacher_onnx, TargetConfig.model_validate(target))
