from typing import Annotated, List

from zenml import get_step_context, step
from zenml.types import MarkdownString

from edgeopt.artifacts import Dataset, ModelArtifact
from edgeopt.measure.evaluate import Evaluation
from edgeopt.select.pareto import Selection
from edgeopt.select.promotion import Decision
from edgeopt.select.report import PlotImage
from edgeopt.track.provenance import provenance
from edgeopt.track.runs import TrackedRuns, log_pipeline_run


@step(enable_cache=False)
def track(
    evaluation: Evaluation, selection: Selection, decision: Decision, selection_report: MarkdownString,
    pareto_plot: PlotImage,
    models: List[ModelArtifact], dataset: Dataset, config: dict, tracking_uri: str, experiment: str,
) -> Annotated[TrackedRuns, "mlflow_runs"]:
    """Log the run to MLflow: a parent run and one nested run per variant, each variant's model as an
    MLflow LoggedModel with its metrics, the dataset as every run's input. Always runs, so a cached
    pipeline run is still recorded whole."""
    ctx = get_step_context()
    tags = {
        **provenance(), "data_hash": dataset.data_hash, "zenml.pipeline": ctx.pipeline.name,
        "zenml.run_name": ctx.pipeline_run.name, "zenml.run_id": str(ctx.pipeline_run.id),
    }
    return log_pipeline_run(
        uri=tracking_uri, experiment=experiment, run_name=ctx.pipeline_run.name, config=config,
        evaluation=evaluation, selection=selection, decision=decision, models={m.variant: m for m in models},
        dataset=dataset, report_md=str(selection_report), plot_png=pareto_plot.png, tags=tags,
    )
