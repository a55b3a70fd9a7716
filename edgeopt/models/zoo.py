"""Architectures by name, and safe checkpoints.

``ARCHITECTURES`` maps a config name to a builder ``(num_classes, in_channels, width) -> nn.Module``:
two small CNNs sized for small inputs (the embedded default) and torchvision's classifiers, built
with random weights (nothing is downloaded). Checkpoints are state dicts loaded with
``weights_only=True``; a pruned model's reduced layer shapes are read back from the weights' own
shapes, and a low-rank one's factorized layers from the ``lowrank_plan`` in its manifest
(:func:`apply_lowrank_plan`; ``edgeopt.shrink.lowrank`` makes them), so a shrunk student reloads into
its named architecture without any pickled code. A model brought as ONNX is made a torch model by
onnx2torch (:func:`graph_module`; ``edgeopt.models.brought`` checks it against the file): its
checkpoints keep the ONNX graph it was converted from beside the weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, cast

import torch
from torch import nn

from edgeopt.artifacts import Checkpoint, new_workdir
from edgeopt.config import ARCHITECTURE_NAMES
from edgeopt.runtimes.torch import OnnxModule


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def small_cnn(num_classes: int, in_channels: int, width: int) -> nn.Module:
    """Three conv-BN-ReLU blocks (widths w, 2w, 2w; two stride-2) + global pool + linear."""
    return nn.Sequential(
        _conv_bn(in_channels, width),
        _conv_bn(width, 2 * width, stride=2),
        _conv_bn(2 * width, 2 * width, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


class BasicBlock(nn.Module):
    """The ResNet basic block (two 3x3 conv-BN, identity or projected shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetSmall(nn.Module):
    """A narrow ResNet for small inputs: stride-1 stem, no max-pool, 3 stages of 2 BasicBlocks."""

    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        self.stem = _conv_bn(in_channels, width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            stages += [BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def _torchvision(name: str) -> Callable[[int, int, int], nn.Module]:
    def build(num_classes: int, in_channels: int, width: int) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if in_channels != 3:  # e.g. grayscale data: the stem convolution takes in_channels
            parent, attr, conv = _first_conv(model)
            setattr(parent, attr, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                            conv.padding, conv.dilation, conv.groups, conv.bias is not None))
        return model

    build.__doc__ = f"torchvision.models.{name} (random init; width is ignored)"
    return build


ARCHITECTURES: Dict[str, Callable[[int, int, int], nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet_small": ResNetSmall,
    **{n: _torchvision(n) for n in ARCHITECTURE_NAMES[2:]},
}


def _first_conv(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, m
    raise ValueError("the model has no Conv2d layer")


def build_model(arch: str, num_classes: int, in_channels: int, width: int) -> nn.Module:
    return ARCHITECTURES[arch](num_classes, in_channels, width)


CONVERTED = "onnx2torch"  # the arch name of a brought ONNX model converted to torch
CONVERTED_GRAPH = "graph.onnx"  # the ONNX graph it was converted from, kept in each of its checkpoints


def graph_module(graph) -> nn.Module:
    """The torch model (onnx2torch's torch.fx GraphModule) of an ONNX graph (a path or ModelProto);
    its initializers become the parameters."""
    import onnx
    from onnx2torch import convert

    model = onnx.load(str(graph)) if isinstance(graph, (str, Path)) else graph
    for node in model.graph.node:  # an omitted trailing optional input is "": onnx2torch takes it for a tensor
        while node.input and not node.input[-1]:
            node.input.pop()
    return convert(model)


def add_batchnorm(model: nn.Module) -> List[nn.BatchNorm2d]:
    """A BatchNorm2d after every Conv2d, in place: an exported model has its BatchNorms folded into
    the convolutions, and fine-tuning it without them is slow and unstable. Each starts as the identity
    in eval mode; :func:`calibrate_batchnorm` makes it the identity on real data in train mode too."""
    added = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d):
            bn = nn.BatchNorm2d(m.out_channels)
            bn.running_var = torch.full((m.out_channels,), 1 - bn.eps)
            model.set_submodule(name, nn.Sequential(m, bn))
            added.append(bn)
    return added


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, norms: List[nn.BatchNorm2d], batches: Iterable[torch.Tensor]) -> None:
    """Set each of ``norms`` (identity so far) to its input's per-channel mean and variance over
    ``batches``, with weight = std and bias = mean: in eval mode the model computes what it did, in
    train mode (batch statistics) nearly so, and pruning and fine-tuning see real statistics."""
    seen: Dict[int, List[Tuple[int, torch.Tensor, torch.Tensor]]] = {}  # per norm: (values, mean, var) per batch

    def record(bn, inputs, _output):
        x = inputs[0]
        var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], correction=0)
        seen.setdefault(id(bn), []).append((x.numel() // x.shape[1], mean.double(), var.double()))

    hooks = [bn.register_forward_hook(record) for bn in norms]
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for bn in norms:  # the batches' statistics pooled (exactly: each batch's variance about the overall mean)
        ns, ms, vs = zip(*seen[id(bn)])
        counts, means = torch.tensor(ns, dtype=torch.float64)[:, None], torch.stack(ms)
        mean = (counts * means).sum(0) / counts.sum()
        var = (counts * (torch.stack(vs) + (means - mean) ** 2)).sum(0) / counts.sum()
        bn.running_mean, bn.running_var = mean.float(), var.float()
        bn.weight.copy_((var + bn.eps).sqrt())
        bn.bias.copy_(mean)


def count_macs_params(model: nn.Module, input_shape) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass at batch 1."""
    import torch_pruning as tp

    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    return int(macs), int(params)


def save_checkpoint(model: nn.Module, *, role: str, arch: Dict[str, Any], input_shape, info: Dict[str, Any],
                    graph: Optional[Path] = None) -> Checkpoint:
    """Write a Checkpoint folder: ``weights.pt`` (a plain state dict) + the manifest (+ ``graph``, the
    ONNX graph a converted model is rebuilt from)."""
    out = new_workdir(role)
    model.eval()
    torch.save(model.state_dict(), out / "weights.pt")
    if graph is not None:
        shutil.copy2(graph, out / CONVERTED_GRAPH)
    macs, params = count_macs_params(model, input_shape)
    return Checkpoint.write(
        out, {"role": role, "arch": arch, "input_shape": list(input_shape), "macs": macs, "params": params, **info}
    )


def load_checkpoint(ckpt: Checkpoint | Path) -> nn.Module:
    """Rebuild the architecture and load the weights (``weights_only=True``: no code is unpickled)."""
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)
    if ckpt.onnx_file is not None:  # a model brought as an ONNX file
        return OnnxModule(ckpt.onnx_file)
    a = ckpt.manifest["arch"]
    if a["name"] == CONVERTED:
        model = graph_module(ckpt.path / CONVERTED_GRAPH)
        if a.get("batchnorm"):
            add_batchnorm(model)
    else:
        model = build_model(a["name"], a["num_classes"], a["in_channels"], a["width"])
    apply_lowrank_plan(model, ckpt.manifest.get("lowrank_plan", {}))
    state = torch.load(ckpt.path / "weights.pt", map_location="cpu", weights_only=True)
    _reshape_to(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def factor_pair(m: nn.Module, rank: int) -> nn.Sequential:
    """The two layers that replace a Linear or Conv2d ``m`` factorized at ``rank`` (freshly initialized;
    ``edgeopt.shrink.lowrank`` fills them): ``Linear(in, r, bias=False)`` then ``Linear(r, out)``, or
    ``Conv(in, r, k, stride, padding, bias=False)`` then ``Conv(r, out, 1x1)``."""
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        return nn.Sequential(nn.Linear(m.in_features, rank, bias=False), nn.Linear(rank, m.out_features, bias=bias))
    conv = cast(nn.Conv2d, m)
    # torch types a Conv2d's kernel_size, stride, padding, dilation tuple[int, ...], and its arguments 2-tuples
    return nn.Sequential(
        nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,  # type: ignore[arg-type]
                  bias=False, padding_mode=conv.padding_mode),
        nn.Conv2d(rank, conv.out_channels, 1, bias=bias),
    )


def apply_lowrank_plan(model: nn.Module, plan: Dict[str, int]) -> nn.Module:
    """Give ``model`` the factorized structure of ``plan`` ``{layer name: rank}`` (what a low-rank
    checkpoint records), ready to load its weights into."""
    for name, rank in plan.items():
        model.set_submodule(name, factor_pair(model.get_submodule(name), rank))
    return model


def _reshape_to(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Resize Conv2d/Linear/BatchNorm layers to the shapes in ``state`` (undoes structured pruning)."""
    for name, m in model.named_modules():
        w = state.get(f"{name}.weight" if name else "weight")
        if w is None or not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) or w.shape == m.weight.shape:
            continue
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            m.out_channels = w.shape[0]
            m.groups = w.shape[0] if depthwise else m.groups
            m.in_channels = w.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = w.shape
        else:
            m.num_features = w.shape[0]
            for buf in ("running_mean", "running_var"):
                setattr(m, buf, torch.empty(w.shape))
        m.weight = nn.Parameter(torch.empty(w.shape))
        if getattr(m, "bias", None) is not None:
            m.bias = nn.Parameter(torch.empty(w.shape[0]))
