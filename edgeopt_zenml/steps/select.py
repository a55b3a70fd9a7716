from typing import Annotated, Tuple

from zenml import get_step_context, step
from zenml.types import MarkdownString

from edgeopt.config import PromotionConfig
from edgeopt.measure.evaluate import Evaluation
from edgeopt.select.pareto import Selection, TargetSelection, TargetSelections
from edgeopt.select.pareto import select as _select
from edgeopt.select.promotion import Decision, decide
from edgeopt.select.report import PlotImage, pareto_plot_artifact, selection_report
from edgeopt_zenml.materializers import ImageMaterializer, SelectionMaterializer


def _select_and_decide(ev: Evaluation, constraints: dict, objective: str, rule: PromotionConfig) -> Tuple[Selection, Decision]:
    sel = _select(ev.metrics_by_variant(), constraints, objective)
    winner = ev.result(sel.winner) if sel.winner else None
    return sel, decide(winner, ev.champion, rule, sel.reason)


@step(enable_cache=False, output_materializers={"selection": SelectionMaterializer, "pareto_plot": ImageMaterializer})
def select(
    evaluation: Evaluation, constraints: dict, objective: str, promotion: dict, aliases: dict | None = None,
) -> Tuple[
    Annotated[Selection, "selection"], Annotated[Decision, "decision"],
    Annotated[MarkdownString, "selection_report"], Annotated[PlotImage, "pareto_plot"],
    Annotated[TargetSelections, "target_selections"],
]:
    """Constraints, Pareto front, objective: the winner and why; then champion vs challenger. With
    target devices (``aliases``: label -> registry alias), the same for each device on its own
    measurements; ``selection`` and ``decision`` are the first device's."""
    rule = PromotionConfig.model_validate(promotion)
    sel, decision = _select_and_decide(evaluation, constraints, objective, rule)
    targets = TargetSelections()
    if aliases:
        for ev in evaluation.devices:
            s, d = (sel, decision) if ev is evaluation else _select_and_decide(ev, constraints, objective, rule)
            targets.targets.append(TargetSelection(label=ev.label, fingerprint=str(ev.fingerprint["id"]),
                                                   cpu=str(ev.fingerprint["cpu"]), alias=aliases[ev.label],
                                                   selection=s, decision=d))
    report = selection_report(evaluation, sel, decision, get_step_context().pipeline_run.name, targets)
    return sel, decision, MarkdownString(report), pareto_plot_artifact(evaluation, sel), targets
