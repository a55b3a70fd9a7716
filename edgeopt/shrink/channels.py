"""Pruning on torch models: structured channel pruning (torch-pruning) and unstructured magnitude
sparsity (``torch.nn.utils.prune``). The techniques that use them (``edgeopt.shrink.prune``,
``edgeopt.shrink.sparsity``) add the options and the KD fine-tune; these functions are usable
alone from a notebook::

    prune_channels(model, (3, 224, 224), num_classes=10, ratio=0.5, importance="l2")
"""

from __future__ import annotations

import itertools
import logging
import zlib
from typing import Dict, List, Optional, Sequence, Tuple, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from edgeopt.artifacts import Dataset
from edgeopt.models.zoo import count_macs_params
from edgeopt.shrink.prune import PruneOptions

log = logging.getLogger(__name__)

IMPORTANCES = get_args(PruneOptions.model_fields["importance"].annotation)  # l1, l2, taylor, bn_scale, fpgm, random
TAYLOR_BATCHES, TAYLOR_BATCH_SIZE = 4, 64  # train batches whose gradients score channels for ``taylor``


def output_layers(model: nn.Module, num_classes: int) -> List[nn.Module]:
    """The classifier layers (Linear or Conv2d with ``num_classes`` outputs): never shrunk."""
    return [
        m for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)
    ]


def _importance(name: str):
    import torch_pruning as tp

    imp = tp.importance
    builders = {
        "l1": lambda: imp.MagnitudeImportance(p=1), "l2": lambda: imp.MagnitudeImportance(p=2),
        "taylor": imp.TaylorImportance, "bn_scale": imp.BNScaleImportance, "fpgm": imp.FPGMImportance,
        "random": imp.RandomImportance,
    }
    if name not in builders:
        raise ValueError(f"unknown channel importance {name!r}; expected one of {', '.join(IMPORTANCES)}")
    return builders[name]()


def _accumulate_gradients(model: nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fresh gradients of the cross-entropy over ``batches`` (what Taylor importance scores), in eval
    mode so that BatchNorm statistics stay as they are."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()


def prune_channels(model: nn.Module, input_shape, num_classes: int, ratio: float, importance: str = "l2", *,
                   global_pruning: bool = False, iterative_steps: int = 1, round_to: Optional[int] = None,
                   gradient_batches: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer group, in place; returns the model.

    ``importance`` is one of l1, l2, taylor, bn_scale, fpgm, random; ``taylor`` needs
    ``gradient_batches`` ((images, labels) tensors), scored again before each of the
    ``iterative_steps`` steps. ``global_pruning`` ranks channels across all layers. ``round_to``
    keeps a multiple of that many channels in each pruned layer (torch-pruning rounds the count left
    down, and leaves a layer whole rather than empty).
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    if iterative_steps < 1:
        raise ValueError(f"iterative_steps must be at least 1, got {iterative_steps}")
    imp = _importance(importance)
    if importance == "taylor" and not gradient_batches:
        raise ValueError("taylor importance needs gradient_batches: (images, labels) to score channels with")
    if ratio == 0:
        return model
    import torch_pruning as tp

    model.eval()  # tracing the graph must not update BatchNorm statistics
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(1, *input_shape), importance=imp, pruning_ratio=ratio, global_pruning=global_pruning,
        iterative_steps=iterative_steps, ignored_layers=output_layers(model, num_classes), round_to=round_to,
    )
    before = count_macs_params(model, input_shape)
    for _ in range(iterative_steps):
        if importance == "taylor":
            _accumulate_gradients(model, gradient_batches)
        pruner.step()
    model.zero_grad(set_to_none=True)
    after = count_macs_params(model, input_shape)
    log.info(
        "prune: ratio=%.2f importance=%s global=%s steps=%d MACs %s->%s params %s->%s", ratio, importance,
        global_pruning, iterative_steps, _si(before[0]), _si(after[0]), _si(before[1]), _si(after[1]),
    )
    return model


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _sparsifiable(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def sparsify(model: nn.Module, amount: float, global_pruning: bool = True) -> List[Tuple[nn.Module, str]]:
    """Zero ``amount`` of the Conv2d/Linear weights by magnitude (one global threshold, or per layer).

    The zeros are a pruning mask (``torch.nn.utils.prune``) that stays applied while the model
    trains; :func:`bake_sparsity` makes them plain zeros in the weights. Returns the masked params.
    """
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


def taylor_batches(dataset: Dataset, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A few shuffled train batches whose gradients score channels for ``taylor`` importance."""
    batches = dataset.batches("train", TAYLOR_BATCH_SIZE, shuffle=True, seed=seed)
    return [(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y)))
            for x, y in itertools.islice(batches, TAYLOR_BATCHES)]
