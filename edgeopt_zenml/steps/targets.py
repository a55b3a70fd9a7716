from typing import Annotated, List

from zenml import step

from edgeopt.measure.evaluate import Evaluation
from edgeopt.registry.promote import PromotionResult, promote_winner
from edgeopt.select.pareto import TargetSelections
from edgeopt.track.runs import TrackedRuns, log_target_metrics


@step(enable_cache=False)
def track_targets(
    evaluation: Evaluation, target_selections: TargetSelections, mlflow_runs: TrackedRuns, tracking_uri: str,
    registered_model: str,
) -> Annotated[List[PromotionResult], "target_promotions"]:
    """With target devices: every device's metrics on the variant runs (``<label>.<metric>``, tagged
    with its fingerprint), and each device after the first gets its own winner promoted to its alias
    (``<alias>-<label>``) under the same rule and compare-and-set as the champion. The first device's
    promotion is the ``promote`` step's, and it alone drives the deploy folder."""
    tags = {**mlflow_runs.tags, "mlflow_parent_run_id": mlflow_runs.parent_run_id}
    for ev, t in zip(evaluation.devices, target_selections.targets):
        log_target_metrics(tracking_uri, mlflow_runs, ev, t.selection)
    return [
        promote_winner(uri=tracking_uri, name=registered_model, alias=t.alias, selection=t.selection, evaluation=ev,
                       decision=t.decision, runs=mlflow_runs, tags={**tags, "target": t.label,
                                                                     "device_fingerprint": t.fingerprint})
        for ev, t in zip(evaluation.others, target_selections.targets[1:])
    ]
