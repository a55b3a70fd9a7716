import tempfile
from pathlib import Path
from typing import Annotated, List

from zenml import step

from edgeopt.artifacts import Checkpoint, Dataset, ModelArtifact
from edgeopt.config import TargetConfig
from edgeopt.evaluation import Evaluation, evaluate_variants
from edgeopt.tracking import fetch_champion
from materializers import EvaluationMaterializer


@step(enable_cache=False, output_materializers=EvaluationMaterializer)
def evaluate(
    models: List[ModelArtifact], dataset: Dataset, teacher: Checkpoint, teacher_onnx: ModelArtifact,
    runtimes: List[str], target: dict, tracking_uri: str, registered_model: str, alias: str,
) -> Annotated[Evaluation, "evaluation"]:
    """Measure every variant, the teacher and the current champion in this one process: never
    cached, so latencies are always same-run comparisons."""
    with tempfile.TemporaryDirectory() as tmp:
        champion = fetch_champion(tracking_uri, registered_model, alias, Path(tmp))
        return evaluate_variants(models, runtimes, dataset, teacher, teacher_onnx,
                                 TargetConfig.model_validate(target), champion)
