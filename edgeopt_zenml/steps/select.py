from typing import Annotated, Tuple

from zenml import get_step_context, step
from zenml.types import MarkdownString

from edgeopt.config import PromotionConfig
from edgeopt.evaluation import Evaluation
from edgeopt.pareto import Selection
from edgeopt.pareto import select as _select
from edgeopt.promotion import Decision, decide
from edgeopt.report import PlotImage, pareto_plot_artifact, selection_report
from edgeopt_zenml.materializers import ImageMaterializer, SelectionMaterializer


@step(enable_cache=False, output_materializers={"selection": SelectionMaterializer, "pareto_plot": ImageMaterializer})
def select(
    evaluation: Evaluation, constraints: dict, objective: str, promotion: dict
) -> Tuple[
    Annotated[Selection, "selection"], Annotated[Decision, "decision"],
    Annotated[MarkdownString, "selection_report"], Annotated[PlotImage, "pareto_plot"],
]:
    """Constraints, Pareto front, objective: the winner and why; then champion vs challenger."""
    sel = _select(evaluation.metrics_by_variant(), constraints, objective)
    winner = evaluation.result(sel.winner) if sel.winner else None
    decision = decide(winner, evaluation.champion, PromotionConfig.model_validate(promotion), sel.reason)
    report = selection_report(evaluation, sel, decision, get_step_context().pipeline_run.name)
    return sel, decision, MarkdownString(report), pareto_plot_artifact(evaluation, sel)
