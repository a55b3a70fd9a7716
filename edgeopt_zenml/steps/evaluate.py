import tempfile
from pathlib import Path
from typing import Annotated, Dict, List, Optional

from zenml import step

from edgeopt.agent.targets import evaluate_on_targets, target_aliases
from edgeopt.artifacts import Dataset, ModelArtifact
from edgeopt.config import DeviceTargetConfig, TargetConfig
from edgeopt.measure.evaluate import Evaluation, evaluate_variants
from edgeopt.registry.versions import fetch_champion
from edgeopt_zenml.materializers import EvaluationMaterializer


@step(enable_cache=False, output_materializers=EvaluationMaterializer)
def evaluate(
    models: List[ModelArtifact], dataset: Dataset, evaluations: Dict[str, List[str]], reference: str, target: dict,
    tracking_uri: str, registered_model: str, alias: str, targets: Optional[List[dict]] = None,
) -> Annotated[Evaluation, "evaluation"]:
    """Measure every variant, the reference and the current champion in this one process, or, with
    ``targets``, on each target device through its agent (each with its own champion): never cached,
    so latencies are always same-run comparisons."""
    t = TargetConfig.model_validate(target)
    with tempfile.TemporaryDirectory() as tmp:
        if not targets:
            champion = fetch_champion(tracking_uri, registered_model, alias, Path(tmp))
            return evaluate_variants(models, evaluations, dataset, reference, t, champion)
        devices = [DeviceTargetConfig.model_validate(d) for d in targets]
        champions = {}
        for label, a in target_aliases(alias, devices).items():
            (Path(tmp) / label).mkdir()
            champions[label] = fetch_champion(tracking_uri, registered_model, a, Path(tmp) / label)
        return evaluate_on_targets(models, evaluations, dataset, reference, t, devices, champions)
