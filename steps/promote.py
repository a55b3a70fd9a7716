from typing import Annotated

from zenml import get_step_context, log_metadata, step
from zenml.enums import ModelStages

from edgeopt.evaluation import Evaluation
from edgeopt.pareto import Selection
from edgeopt.tracking import promote_winner


@step(enable_cache=False)
def promote(
    evaluation: Evaluation, selection: Selection, mlflow_runs: dict, tracking_uri: str, registered_model: str,
    alias: str,
) -> Annotated[dict, "promotion"]:
    """Register the winner in MLflow, move the alias, and mark this ZenML model version production."""
    ctx = get_step_context()
    tags = {**mlflow_runs["tags"], "mlflow_parent_run_id": mlflow_runs["parent_run_id"]}
    result = promote_winner(uri=tracking_uri, name=registered_model, alias=alias, selection=selection,
                            evaluation=evaluation, runs=mlflow_runs, tags=tags)
    if result["promoted"] and ctx.model is not None:
        ctx.model.set_stage(ModelStages.PRODUCTION, force=True)
        log_metadata(metadata={"promotion": {**tags, **{k: v for k, v in result.items() if k != "runtime_settings"},
                                             "front": selection.front}}, infer_model=True)
    return result
