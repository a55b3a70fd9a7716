import tempfile
from pathlib import Path
from typing import Annotated, Dict, List

from zenml import step

from edgeopt.artifacts import Dataset, ModelArtifact
from edgeopt.config import TargetConfig
from edgeopt.evaluation import Evaluation, evaluate_variants
from edgeopt.tracking import fetch_champion
from edgeopt_zenml.materializers import EvaluationMaterializer


@step(enable_cache=False, output_materializers=EvaluationMaterializer)
def evaluate(
    models: List[ModelArtifact], dataset: Dataset, evaluations: Dict[str, List[str]], reference: str, target: dict,
    tracking_uri: str, registered_model: str, alias: str,
) -> Annotated[Evaluation, "evaluation"]:
    """Measure every variant, the reference and the current champion in this one process: never
    cached, so latencies are always same-run comparisons."""
    with tempfile.TemporaryDirectory() as tmp:
        champion = fetch_champion(tracking_uri, registered_model, alias, Path(tmp))
        return evaluate_variants(models, evaluations, dataset, reference, TargetConfig.model_validate(target), champion)
