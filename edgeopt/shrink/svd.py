"""Low-rank factorization by truncated SVD: one big layer becomes two thin ones.

A weight ``W`` (``[out, in]``, or ``[out, in*k*k]`` for a k x k convolution) is replaced by
``U_r sqrt(S_r)`` after ``sqrt(S_r) V_r^T``, where ``r`` is the smallest rank keeping the asked
fraction of the squared singular-value energy. A Linear becomes ``Linear(in, r, bias=False)`` then
``Linear(r, out)``; a convolution becomes ``Conv(in, r, k, stride, padding, bias=False)`` then
``Conv(r, out, 1x1)``. Both are plain layers: the result exports to ONNX like any other model.

The plan ``{layer name: rank}`` is all a checkpoint needs to rebuild the factorized structure::

    plan = factorize_lowrank(model, energy=0.9, min_params_saved=0.1)
    apply_lowrank_plan(build_model(...), plan)  # same shapes, ready for load_state_dict
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)


def _factorizable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _weight_matrix(m: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in*k*k]``."""
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def _factor_pair(m: nn.Module, rank: int) -> nn.Sequential:
    """The two layers replacing ``m`` at ``rank`` (freshly initialized)."""
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        return nn.Sequential(nn.Linear(m.in_features, rank, bias=False), nn.Linear(rank, m.out_features, bias=bias))
    return nn.Sequential(
        nn.Conv2d(m.in_channels, rank, m.kernel_size, m.stride, m.padding, m.dilation, bias=False,
                  padding_mode=m.padding_mode),
        nn.Conv2d(rank, m.out_channels, 1, bias=bias),
    )


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the total squared energy."""
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
        pair = _factor_pair(m, rank)
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


def apply_lowrank_plan(model: nn.Module, plan: Dict[str, int]) -> nn.Module:
    """Give ``model`` the factorized structure of ``plan`` (to load a low-rank checkpoint into)."""
    for name, rank in plan.items():
        model.set_submodule(name, _factor_pair(model.get_submodule(name), rank))
    return model
