"""Unstructured magnitude sparsity: single weights set to zero (``torch.nn.utils.prune``). The zeros
stay in dense tensors, so the model is smaller only once compressed (the checkpoint's sparsity report
measures it) and no faster on CPU runtimes."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Dict, List, Tuple

from pydantic import Field

from edgeopt.shrink.base import Applied, ShrinkContext, Technique, TechniqueOptions

if TYPE_CHECKING:
    from torch import nn


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
        masked = sparsify(model, amount, opts.global_pruning)

        def after_finetune():  # the fine-tune trained through the mask: now the zeros become plain zeros
            bake_sparsity(masked)
            return {"sparsity": sparsity_report(model, ctx.load_base())}

        return {"global_pruning": opts.global_pruning}, after_finetune


def _sparsifiable(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    from torch import nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def sparsify(model: nn.Module, amount: float, global_pruning: bool = True) -> List[Tuple[nn.Module, str]]:
    """Zero ``amount`` of the Conv2d/Linear weights by magnitude (one global threshold, or per layer).

    The zeros are a pruning mask (``torch.nn.utils.prune``) that stays applied while the model
    trains; :func:`bake_sparsity` makes them plain zeros in the weights. Returns the masked params.
    """
    from torch.nn.utils import prune

    if not 0 < amount < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {amount}")
    params = [(m, "weight") for _, m in _sparsifiable(model)]
    if global_pruning:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for m, name in params:
            prune.l1_unstructured(m, name, amount=amount)
    return params


def bake_sparsity(params: List[Tuple[nn.Module, str]]) -> None:
    """Remove the pruning reparametrization: the masked weights become plain zeros."""
    from torch.nn.utils import prune

    for m, name in params:
        prune.remove(m, name)


def _weights_blob(model: nn.Module) -> bytes:
    return b"".join(m.weight.detach().numpy().tobytes() for _, m in _sparsifiable(model))


def sparsity_report(sparse: nn.Module, dense: nn.Module) -> Dict:
    """Measured sparsity of each Conv2d/Linear weight and overall, and what zlib makes of the
    weight bytes of ``dense`` and ``sparse`` (the saving sparsity buys once compressed)."""
    layers = {n: float((m.weight == 0).float().mean()) for n, m in _sparsifiable(sparse)}
    zeros = sum(int((m.weight == 0).sum()) for _, m in _sparsifiable(sparse))
    total = sum(m.weight.numel() for _, m in _sparsifiable(sparse))
    blob = _weights_blob(sparse)
    dense_z, sparse_z = len(zlib.compress(_weights_blob(dense))), len(zlib.compress(blob))
    return {
        "layers": layers, "overall": zeros / total, "weight_bytes": len(blob),
        "zlib_bytes_dense": dense_z, "zlib_bytes_sparse": sparse_z, "zlib_saving": 1 - sparse_z / dense_z,
    }
