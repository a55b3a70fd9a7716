"""Structured channel pruning (torch-pruning, DepGraph): whole channels go, so the model is
physically smaller and faster. Coupled channels (residual adds, depthwise convs) go together; the
classifier's outputs are never pruned. :func:`prune_channels` is usable alone from a notebook::

    prune_channels(model, (3, 224, 224), num_classes=10, ratio=0.5, importance="l2")
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Sequence, Tuple, get_args

from pydantic import Field

from edgeopt.shrink.base import Applied, ShrinkContext, Technique, TechniqueOptions, output_layers

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from edgeopt.artifacts import Dataset

log = logging.getLogger(__name__)

Importance = Literal["l1", "l2", "taylor", "bn_scale", "fpgm", "random"]
IMPORTANCES = get_args(Importance)  # torch-pruning's importances
TAYLOR_BATCHES, TAYLOR_BATCH_SIZE = 4, 64  # train batches whose gradients score channels for ``taylor``
RECONSTRUCTION_BATCHES = 2  # un-augmented train batches of 64: the images the layers are refit on after pruning


class PruneOptions(TechniqueOptions):
    """``amounts``: fractions of the channels to remove in every prunable layer group."""

    importance: Importance = Field("l2", description="Channel importance criterion (torch-pruning importances).")
    global_pruning: bool = Field(False, description="Rank channels across all layers instead of per layer.")
    iterative_steps: int = Field(1, ge=1, le=100, description="Reach the ratio in this many pruning steps.")
    round_to: Optional[int] = Field(
        8, ge=1, le=256,
        description="Keep a multiple of this many channels in every pruned layer (torch-pruning's round_to: the "
                    "count left is rounded down; a layer that would lose all its channels is left whole). CPU "
                    "convolution kernels work on blocks of 8 (AVX2) or 16 (AVX-512) channels: on EfficientNet-Lite0, "
                    "10 % pruning without rounding ran 1.5x slower on ONNX Runtime than the unpruned model, with "
                    "round_to 16 1.3x faster. null: exact ratios.")
    keep_residual: bool = Field(
        False, description="Prune only the channels one layer owns (the hidden channels of residual and inverted-"
                            "residual blocks) and keep whole the channels that several layers write together (a "
                            "residual stream, tied by its adds). The block outputs then keep every channel, and "
                            "with reconstruct the 1x1 convolution ending each block is refit to the unpruned "
                            "model's full output.")
    reconstruct: bool = Field(
        False, description="Right after pruning, refit each 1x1 convolution and Linear layer by least squares so that "
                           "it gives the unpruned model's outputs on 128 train images (edgeopt.shrink.reconstruct), "
                           "before the KD fine-tune: on a fully fine-tuned EfficientNet-Lite1, 20 % pruning left 17 % "
                           "val accuracy (chance), the refit 94 % in 39 s, as much as a 100-step KD fine-tune gave. "
                           "Off by default: on the digits CNN (only its classifier refit) the 1-epoch fine-tune at lr "
                           "0.02 ended lower from the refit model than from the plain pruned one.")


class Prune(Technique):
    name = "prune"
    tag = "p"
    role = "pruned"
    Options = PruneOptions

    def recipe(self, amount: float, opts: PruneOptions) -> str:  # type: ignore[override]
        scope = "global" if opts.global_pruning else "per layer"
        rounded = f", channels in multiples of {opts.round_to}" if opts.round_to and opts.round_to > 1 else ""
        residual = ", residual streams kept whole" if opts.keep_residual else ""
        return (f"structured channel pruning {amount:.0%} ({opts.importance}, {scope}, {opts.iterative_steps} "
                f"step(s){rounded}{residual})")

    def apply(self, model, amount: float, opts: PruneOptions, ctx: ShrinkContext) -> Applied:  # type: ignore[override]
        import torch

        from edgeopt.shrink.reconstruct import reconstruct

        reference = copy.deepcopy(model) if opts.reconstruct else None
        kept = prune_channels(model, ctx.input_shape, ctx.num_classes, amount, opts.importance,
                              global_pruning=opts.global_pruning, iterative_steps=opts.iterative_steps,
                              round_to=opts.round_to, keep_residual=opts.keep_residual,
                              gradient_batches=shuffled_train_batches(ctx.dataset, ctx.seed) if opts.importance == "taylor" else None)
        applied: Dict[str, Any] = {"prune_ratio": amount, "importance": opts.importance, "global_pruning": opts.global_pruning,
                   "iterative_steps": opts.iterative_steps, "round_to": opts.round_to,
                   "keep_residual": opts.keep_residual}
        if reference is not None:
            images = torch.cat([x for x, _ in shuffled_train_batches(ctx.dataset, ctx.seed, RECONSTRUCTION_BATCHES)])
            applied["reconstruction"] = reconstruct(model, reference, kept, images, seed=ctx.seed)
        return applied, None


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
    import torch.nn.functional as F

    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()


def prune_channels(model: nn.Module, input_shape, num_classes: int, ratio: float, importance: str = "l2", *,
                   global_pruning: bool = False, iterative_steps: int = 1, round_to: Optional[int] = None,
                   gradient_batches: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
                   keep_residual: bool = False) -> Dict[str, np.ndarray]:
    """Remove ``ratio`` of the channels of every prunable layer group, in place; returns, for each layer
    that lost output channels, which of its original output channels it kept (module name -> indices;
    what :func:`edgeopt.shrink.reconstruct.reconstruct` needs).

    ``importance`` is one of l1, l2, taylor, bn_scale, fpgm, random; ``taylor`` needs
    ``gradient_batches`` ((images, labels) tensors), scored again before each of the
    ``iterative_steps`` steps. ``global_pruning`` ranks channels across all layers. ``round_to``
    keeps a multiple of that many channels in each pruned layer (torch-pruning rounds the count left
    down, and leaves a layer whole rather than empty). ``keep_residual`` leaves whole every channel
    group that several convolutions or Linear layers write together (:func:`shared_group`: the
    channels of a residual stream, tied by its adds) and prunes only the channels one layer owns.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    if iterative_steps < 1:
        raise ValueError(f"iterative_steps must be at least 1, got {iterative_steps}")
    imp = _importance(importance)
    if importance == "taylor" and not gradient_batches:
        raise ValueError("taylor importance needs gradient_batches: (images, labels) to score channels with")
    if ratio == 0:
        return {}
    import numpy as np
    import torch
    import torch_pruning as tp

    from edgeopt.models.zoo import count_macs_params

    model.eval()  # tracing the graph must not update BatchNorm statistics
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(1, *input_shape), importance=imp, pruning_ratio=ratio, global_pruning=global_pruning,
        iterative_steps=iterative_steps, ignored_layers=output_layers(model, num_classes), round_to=round_to,
    )
    before = count_macs_params(model, input_shape)
    names = {m: n for n, m in model.named_modules()}
    kept: Dict[str, np.ndarray] = {}
    for _ in range(iterative_steps):
        if importance == "taylor":
            _accumulate_gradients(model, gradient_batches)
        for group in pruner.step(interactive=True):
            if keep_residual and shared_group(group, pruner.DG):
                continue
            removed: Dict[str, set] = {}
            for dep, idxs in group:
                layer = dep.target.module
                if (isinstance(layer, torch.nn.Module) and layer in names and hasattr(layer, "weight")
                        and pruner.DG.is_out_channel_pruning_fn(dep.handler)):
                    removed.setdefault(names[layer], set()).update(int(i) for i in idxs)
            for name, gone in removed.items():
                now = kept.get(name, np.arange(model.get_submodule(name).weight.shape[0]))
                kept[name] = np.delete(now, sorted(gone))
            group.prune()
    model.zero_grad(set_to_none=True)
    after = count_macs_params(model, input_shape)
    log.info(
        "prune: ratio=%.2f importance=%s global=%s steps=%d MACs %s->%s params %s->%s", ratio, importance,
        global_pruning, iterative_steps, _si(before[0]), _si(after[0]), _si(before[1]), _si(after[1]),
    )
    return kept


def shared_group(group, graph) -> bool:
    """Whether a torch-pruning group removes the same output channels from several non-depthwise
    convolutions or Linear layers: channels that an elementwise op (a residual add) ties together."""
    import torch

    writers = {id(dep.target.module) for dep, _ in group
               if isinstance(dep.target.module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
               and getattr(dep.target.module, "groups", 1) == 1 and graph.is_out_channel_pruning_fn(dep.handler)}
    return len(writers) > 1


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def shuffled_train_batches(dataset: Dataset, seed: int, count: int = TAYLOR_BATCHES) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` shuffled, un-augmented train batches of 64 (images, labels): what scores channels
    for ``taylor`` importance and what the layers are refit on after pruning."""
    import numpy as np
    import torch

    batches = dataset.batches("train", TAYLOR_BATCH_SIZE, shuffle=True, seed=seed)
    return [(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y)))
            for x, y in itertools.islice(batches, count)]
