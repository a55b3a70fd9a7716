"""Low-rank factorization by truncated SVD: one big layer becomes two thin ones.

A weight ``W`` (``[out, in]``, or ``[out, in*k*k]`` for a k x k convolution) is replaced by
``U_r sqrt(S_r)`` after ``sqrt(S_r) V_r^T``, where ``r`` is the smallest rank keeping the asked
fraction of the squared singular-value energy. A Linear becomes ``Linear(in, r, bias=False)`` then
``Linear(r, out)``; a convolution becomes ``Conv(in, r, k, stride, padding, bias=False)`` then
``Conv(r, out, 1x1)``. Both are plain layers: the result exports to ONNX like any other model.

The plan ``{layer name: rank}`` is all a checkpoint needs to rebuild the factorized structure
(``edgeopt.models.zoo`` does it on load)::

    plan = factorize_lowrank(model, energy=0.9, min_params_saved=0.1)
    apply_lowrank_plan(build_model(...), plan)  # same shapes, ready for load_state_dict
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, Iterable

from pydantic import Field

from edgeopt.shrink.base import Applied, ShrinkContext, Technique, TechniqueOptions, output_layers

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


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
        plan = factorize_lowrank(model, amount, opts.min_params_saved, exclude=output_layers(model, ctx.num_classes))
        return {"lowrank_plan": plan, "energy": amount, "min_params_saved": opts.min_params_saved}, None


def _factorizable(m: nn.Module) -> bool:
    from torch import nn

    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _weight_matrix(m: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in*k*k]``."""
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the total squared energy."""
    import torch

    cum = torch.cumsum(singular_values.double() ** 2, 0)
    if cum[-1] == 0:  # an all-zero weight: rank 1 reproduces it
        return 1
    return min(int(torch.searchsorted(cum / cum[-1], torch.tensor([energy], dtype=torch.float64))[0]) + 1,
               len(singular_values))


def params_saved(m: nn.Module, rank: int) -> float:
    """Fraction of the layer's weights saved by factorizing it at ``rank`` (negative: it grows)."""
    out, cols = _weight_matrix(m).shape
    return 1 - rank * (out + cols) / (out * cols)


def factorize_lowrank(model: nn.Module, energy: float, min_params_saved: float = 0.1,
                      exclude: Iterable[nn.Module] = ()) -> Dict[str, int]:
    """Factorize, in place, every Linear and Conv2d (groups 1) not in ``exclude`` at the rank keeping
    ``energy`` of its singular-value energy, when that saves at least ``min_params_saved`` of its
    weights. Returns the plan ``{layer name: rank}`` of the layers factorized."""
    import torch

    from edgeopt.models.zoo import factor_pair

    if not 0 < energy < 1:
        raise ValueError(f"low-rank energy must be in (0, 1), got {energy}")
    if not 0 <= min_params_saved < 1:
        raise ValueError(f"min_params_saved must be in [0, 1), got {min_params_saved}")
    skip = {id(m) for m in exclude}
    plan: Dict[str, int] = {}
    for name, m in list(model.named_modules()):
        if id(m) in skip or not _factorizable(m):
            continue
        u, s, vh = torch.linalg.svd(_weight_matrix(m).double(), full_matrices=False)
        rank = energy_rank(s, energy)
        saved = params_saved(m, rank)
        if saved <= 0 or saved < min_params_saved:
            continue
        pair = factor_pair(m, rank)
        root = s[:rank].sqrt()
        with torch.no_grad():
            pair[0].weight.copy_((root[:, None] * vh[:rank]).reshape(pair[0].weight.shape))
            pair[1].weight.copy_((u[:, :rank] * root).reshape(pair[1].weight.shape))
            if m.bias is not None:
                pair[1].bias.copy_(m.bias)
        model.set_submodule(name, pair)
        plan[name] = rank
        log.info("lowrank: %s rank %d/%d saves %.0f%% of its weights", name, rank, len(s), 100 * saved)
    return plan
