from typing import Annotated

from zenml import get_step_context, log_metadata, step
from zenml.enums import ModelStages

from edgeopt.measure.evaluate import Evaluation
from edgeopt.registry.promote import PromotionResult, promote_winner
from edgeopt.select.pareto import Selection
from edgeopt.select.promotion import Decision
from edgeopt.track.runs import TrackedRuns


@step(enable_cache=False)
def promote(
    evaluation: Evaluation, selection: Selection, decision: Decision, mlflow_runs: TrackedRuns, tracking_uri: str,
    registered_model: str, alias: str,
) -> Annotated[PromotionResult, "promotion"]:
    """If the winner beats the champion: register it in MLflow, move the alias, and mark this
    ZenML model version production. Either way, record the decision (the audit trail)."""
    ctx = get_step_context()
    tags = {**mlflow_runs.tags, "mlflow_parent_run_id": mlflow_runs.parent_run_id}
    result = promote_winner(uri=tracking_uri, name=registered_model, alias=alias, selection=selection,
                            evaluation=evaluation, decision=decision, runs=mlflow_runs, tags=tags)
    if result.promoted:
        ctx.model.set_stage(ModelStages.PRODUCTION, force=True)
    audit = {**tags, **result.model_dump(exclude={"runtime_settings"}), "front": selection.front}
    log_metadata(metadata={"promotion": audit}, infer_model=True)
    return result
