"""Bring your own teacher: a local state dict (``.pt``/``.pth``, loaded with ``weights_only=True``,
or ``.safetensors``) for a named architecture, or an ONNX file.

Nothing is downloaded and no code is unpickled. Mismatches (wrong architecture, wrong number of
classes, wrong input shape) fail with one line naming the file and what differs.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from torch import nn

from edgeopt.artifacts import Checkpoint, new_workdir
from edgeopt.config import PROJECT_ROOT

log = logging.getLogger(__name__)


class PretrainedError(ValueError):
    """A user-supplied model file does not fit; the message names the file."""


def resolve(path: Path) -> Path:
    return path if path.is_absolute() else PROJECT_ROOT / path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(resolve(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OnnxModule(nn.Module):
    """An ONNX model behind the nn.Module interface (inference only), so an ONNX teacher can
    distill a student and be measured like any other teacher. Runs on ONNX Runtime."""

    def __init__(self, path: Path, threads: int = 0):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().cpu().numpy().astype(np.float32, copy=False)
        step = self.fixed_batch or len(a)
        out = [self.session.run(None, {self.input_name: a[i : i + step]})[0] for i in range(0, len(a), step)]
        return torch.from_numpy(np.concatenate(out))


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedError(f"{path}: not a loadable state dict ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint: {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_teacher(path: Path, arch: Dict, input_shape) -> nn.Module:
    """Build ``arch`` and load the state dict at ``path`` strictly; explain any mismatch."""
    from edgeopt.models import build_model

    path = resolve(path)
    model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], arch["width"])
    state = _read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch {shapes[0]}" + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise PretrainedError(
            f"{path}: does not fit teacher.arch={arch['name']} with {arch['num_classes']} classes and "
            f"{arch['in_channels']} input channels: {'; '.join(parts)}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def onnx_teacher(path: Path, input_shape, num_classes: int) -> Checkpoint:
    """Wrap an ONNX teacher as a Checkpoint folder (``model.onnx``); check its input and output."""
    import onnx

    path = resolve(path)
    try:
        m = onnx.load(str(path))
        onnx.checker.check_model(m)
    except Exception as err:
        raise PretrainedError(f"{path}: not a valid ONNX model ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    dims = [d.dim_value or d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(isinstance(d, int) and d != want for d, want in zip(dims[1:], input_shape)):
        raise PretrainedError(f"{path}: input shape {dims} does not fit the data's [N, {', '.join(map(str, input_shape))}]")
    out = OnnxModule(path)(torch.zeros(1, *input_shape))
    if out.shape != (1, num_classes):
        raise PretrainedError(f"{path}: output shape {list(out.shape)} does not fit {num_classes} classes")
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    out_dir = new_workdir("teacher")
    shutil.copy2(path, out_dir / "model.onnx")
    return Checkpoint.write(out_dir, {
        "role": "teacher", "tag": "teacher", "format": "onnx", "source": str(path), "source_sha256": file_sha256(path),
        "arch": {"name": "onnx", "num_classes": num_classes, "in_channels": input_shape[0], "width": 0},
        "input_shape": list(input_shape), "params": params, "macs": 0,
    })
