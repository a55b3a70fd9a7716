from typing import Annotated, Tuple

from zenml import get_step_context, step
from zenml.types import MarkdownString

from edgeopt.evaluation import Evaluation
from edgeopt.pareto import Selection
from edgeopt.pareto import select as _select
from edgeopt.report import PlotImage, pareto_plot_artifact, selection_report
from materializers import ImageMaterializer, SelectionMaterializer


@step(enable_cache=False, output_materializers={"selection": SelectionMaterializer, "pareto_plot": ImageMaterializer})
def select(
    evaluation: Evaluation, constraints: dict, objective: str
) -> Tuple[
    Annotated[Selection, "selection"], Annotated[MarkdownString, "selection_report"], Annotated[PlotImage, "pareto_plot"]
]:
    """Constraints, Pareto front, objective: the winner and why; the report and the plot."""
    sel = _select(evaluation.metrics_by_variant(), constraints, objective)
    report = selection_report(evaluation, sel, get_step_context().pipeline_run.name)
    return sel, MarkdownString(report), pareto_plot_artifact(evaluation, sel)
