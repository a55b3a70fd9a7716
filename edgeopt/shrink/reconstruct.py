"""Least-squares reconstruction after channel pruning: each channel-mixing layer of the pruned model is
refit, in network order, so that from the inputs it now gets (the pruned model's, errors upstream
included) it gives the outputs the unpruned model gave on the same images (He et al. 2017, "Channel
pruning for accelerating very deep neural networks"; ThiNet). Pruning drops a whole channel's
contribution; the refit spreads it over the channels left, with no gradient step.

Measured on the brought-model bench's fully fine-tuned EfficientNet-Lite1 (6 photo classes, 240 px, val
100 %), 20 % of the channels pruned with round_to 16 (``bench/prune_recovery.py``): val accuracy 17.1 %
(chance) right after pruning, 27.5 % with BatchNorm recalibrated, 94.2 % after the refit (42 layers, 128
images, 39 s on 2 cores), as much as the 100-step KD fine-tune (3 minutes) reached from the plain pruned
model.

The layers refit are 1x1 convolutions and Linear layers (every channel mix of a MobileNet or an
EfficientNet; other convolutions keep their pruned weights, and the next refit layer makes up for them).
A layer is left as it was where the images give fewer than ``ROWS_PER_INPUT`` sampled rows per input
(a classifier after global pooling: one row per image), or where the refit does not lower its error.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Tuple, Union, cast

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

ROWS = 16384  # sampled positions (pixels x images) each layer is refit on
RIDGE = 1e-4  # Tikhonov term, relative to the mean input energy: keeps near-collinear channels stable
ROWS_PER_INPUT = 8  # a layer is refit only on at least this many sampled rows per input channel: a classifier
# after global pooling gets one row per image, and refit on 128 images it learns them by heart (a ResNet on
# digits pruned 50 %, its classifier refit on 2 rows per input, fell below 85 % test accuracy after its fine-tune)


def refittable(model: nn.Module) -> List[str]:
    """Names of the layers :func:`reconstruct` refits, in network order: 1x1 convolutions without groups,
    stride or padding (an output pixel is a mix of the same input pixel's channels) and Linear layers."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1)
                                            and m.stride == (1, 1) and m.padding in ((0, 0), "valid"))]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A layer's input or output as rows of channels: (N, C, H, W) -> (N*H*W, C); (..., C) -> (-1, C)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x.reshape(-1, x.shape[-1])


def _weight(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    return layer.weight.detach().flatten(1).double()


@torch.no_grad()
def reconstruct(pruned: nn.Module, reference: nn.Module, kept_out: Mapping[str, np.ndarray],
                images: torch.Tensor, rows: int = ROWS, seed: int = 0) -> Dict[str, float | int]:
    """Refit ``pruned``'s 1x1 convolutions and Linear layers in place against ``reference`` (the same model
    before pruning, same module names) on ``images`` (one batch of model input: train images,
    un-augmented).

    ``kept_out`` names, per pruned layer, which of the reference's output channels it kept (what
    :func:`edgeopt.shrink.prune.prune_channels` returns); a layer missing from it kept all of them.
    Two forward passes: the reference's, which records what each layer gave at ``rows`` sampled positions,
    then the pruned model's, where each layer is refit on the input it gets, before it computes (so that
    the layers after it see its refit output). Returns the layers refit and their mean relative output
    error before and after.
    """
    pruned.eval()
    reference.eval()
    own, ref = dict(pruned.named_modules()), dict(reference.named_modules())
    names = [n for n in refittable(pruned) if n in ref and type(ref[n]) is type(own[n])
             and len(kept_out.get(n, range(ref[n].weight.shape[0]))) == own[n].weight.shape[0]]
    generator = torch.Generator().manual_seed(seed)
    picks: Dict[str, torch.Tensor] = {}
    targets: Dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module, _args, output):
            out = _rows(output)
            picks[name] = torch.randperm(len(out), generator=generator)[:rows]
            keep = kept_out.get(name)
            targets[name] = out[picks[name]] if keep is None else out[picks[name]][:, torch.as_tensor(keep)]
        return hook

    errors_before: List[float] = []
    errors_after: List[float] = []

    def refit(name: str):
        def hook(layer, args):
            if name not in targets:  # a layer the forward calls twice is refit on its first call only
                return
            x_rows, y_rows = _rows(args[0])[picks[name]].double(), targets.pop(name).double()
            solved = _solve(cast(Union[nn.Conv2d, nn.Linear], layer), x_rows, y_rows)
            if solved is not None:
                errors_before.append(solved[0])
                errors_after.append(solved[1])
        return hook

    memory_format = torch.channels_last if images.dim() == 4 else torch.contiguous_format
    x = images.contiguous(memory_format=memory_format)
    for model, hooks in ((reference, {n: ref[n].register_forward_hook(record(n)) for n in names}),
                         (pruned, {n: own[n].register_forward_pre_hook(refit(n)) for n in names})):
        model.to(memory_format=memory_format)
        try:
            model(x)
        finally:
            for handle in hooks.values():
                handle.remove()
            model.to(memory_format=torch.contiguous_format)
    summary = {"layers": len(errors_after), "of": len(names), "images": len(images),
               "error_before": float(np.mean(errors_before)) if errors_before else 0.0,
               "error_after": float(np.mean(errors_after)) if errors_after else 0.0}
    log.info("reconstruct: %d of %d layers refit on %d images, mean relative output error %.3f -> %.3f",
             summary["layers"], summary["of"], summary["images"], summary["error_before"], summary["error_after"])
    return summary


def _solve(layer: nn.Conv2d | nn.Linear, x_rows: torch.Tensor, y_rows: torch.Tensor) -> Tuple[float, float] | None:
    """Set ``layer`` (weight, and bias if it has one) to the ridge least-squares map from ``x_rows`` to
    ``y_rows``; its relative error before and after, or None (left as it was) where there are fewer than
    ``ROWS_PER_INPUT`` rows per input or the fit is no better."""
    inputs = x_rows.shape[1]
    if len(x_rows) < ROWS_PER_INPUT * (inputs + 1):
        return None
    bias = layer.bias
    a = torch.cat([x_rows, torch.ones(len(x_rows), 1, dtype=torch.float64)], 1) if bias is not None else x_rows
    gram = a.T @ a
    gram[:inputs, :inputs] += RIDGE * gram.diagonal()[:inputs].mean() * torch.eye(inputs, dtype=torch.float64)
    solution = torch.linalg.solve(gram, a.T @ y_rows)
    scale = float(y_rows.var()) + 1e-12
    current = x_rows @ _weight(layer).T + (bias.detach().double() if bias is not None else 0)
    before = float(((current - y_rows) ** 2).mean()) / scale
    after = float(((a @ solution - y_rows) ** 2).mean()) / scale
    if not after < before:
        return None
    layer.weight.copy_(solution[:inputs].T.reshape(layer.weight.shape).to(layer.weight.dtype))
    if bias is not None:
        bias.copy_(solution[inputs].to(bias.dtype))
    return before, after
