"""Low-rank factorization: truncated SVD of Linear and Conv layers (a k x k conv becomes a k x k
conv to rank r followed by a 1x1 conv), keeping a fraction of each layer's singular-value energy."""

from __future__ import annotations

from pydantic import Field

from edgeopt.shrink.base import Applied, ShrinkContext, Technique, TechniqueOptions


class LowRankOptions(TechniqueOptions):
    """``amounts``: fractions of each layer's singular-value energy to keep."""

    min_params_saved: float = Field(
        0.1, ge=0, lt=1, description="Factorize a layer only when it saves at least this fraction of its weights.",
    )


class LowRank(Technique):
    name = "lowrank"
    tag = "lr"
    role = "lowrank"
    Options = LowRankOptions

    def recipe(self, amount: float, opts: LowRankOptions) -> str:  # type: ignore[override]
        return f"low-rank SVD keeping {amount:.0%} energy (layers saving >= {opts.min_params_saved:.0%})"

    def apply(self, model, amount: float, opts: LowRankOptions, ctx: ShrinkContext) -> Applied:  # type: ignore[override]
        from edgeopt.shrink.channels import output_layers
        from edgeopt.shrink.svd import factorize_lowrank

        plan = factorize_lowrank(model, amount, opts.min_params_saved, exclude=output_layers(model, ctx.num_classes))
        return {"lowrank_plan": plan, "energy": amount, "min_params_saved": opts.min_params_saved}, None
