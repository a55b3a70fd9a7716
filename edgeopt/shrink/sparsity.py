"""Unstructured magnitude sparsity: single weights set to zero. The zeros stay in dense tensors, so
the model is smaller only once compressed (the checkpoint's sparsity report measures it) and no
faster on CPU runtimes."""

from __future__ import annotations

from pydantic import Field

from edgeopt.shrink.base import Applied, ShrinkContext, Technique, TechniqueOptions


class SparsityOptions(TechniqueOptions):
    """``amounts``: fractions of the Conv/Linear weights set to zero."""

    global_pruning: bool = Field(True, description="One magnitude threshold across all layers.")


class Sparsity(Technique):
    name = "sparsity"
    tag = "sp"
    role = "sparse"
    Options = SparsityOptions

    def recipe(self, amount: float, opts: SparsityOptions) -> str:  # type: ignore[override]
        return f"unstructured magnitude sparsity {amount:.0%} ({'global' if opts.global_pruning else 'per layer'})"

    def apply(self, model, amount: float, opts: SparsityOptions, ctx: ShrinkContext) -> Applied:  # type: ignore[override]
        from edgeopt.shrink.channels import bake_sparsity, sparsify, sparsity_report

        masked = sparsify(model, amount, opts.global_pruning)

        def after_finetune():  # the fine-tune trained through the mask: now the zeros become plain zeros
            bake_sparsity(masked)
            return {"sparsity": sparsity_report(model, ctx.load_base())}

        return {"global_pruning": opts.global_pruning}, after_finetune
