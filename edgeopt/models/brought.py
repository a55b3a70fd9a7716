"""The model a user brings: a local state dict (``.pt``/``.pth``, loaded with ``weights_only=True``,
or ``.safetensors``) for a named architecture, or any single-input image classifier in ONNX.

Nothing is downloaded and no code is unpickled. An ONNX file is inspected before any work
(:func:`inspect_onnx`: opset 13-21, one float32 NCHW input, fixed or dynamic batch, any names, an
output of [N, classes], no custom operators) and what edgeopt cannot take is refused in one line
naming the file and the reason. Whether it outputs logits or probabilities is detected on real
images and recorded, so that KD, evaluation, reports and serving treat it right.

For the structural recipes (pruning, low-rank, sparsity), an ONNX model becomes a torch model
(:func:`torch_from_onnx`): ONNX Runtime's basic graph optimizations fold the graph for its own batch
and the data's image size (every shape computed at run time, e.g. TF "same" padding, becomes a
constant), a final Softmax is set aside so the torch model gives logits, the batch is made a symbol
again and the operators put in forms onnx2torch takes (``edgeopt.models.onnx_graph``), onnx2torch
converts the graph, and the converted model's outputs are checked against the file's own on
validation images, one at a time and several at once. A node that cannot be converted or run is
named, and a conversion that does not match is refused with the measured difference, in one line.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edgeopt.artifacts import Checkpoint, Dataset, new_workdir, sha256_file
from edgeopt.config import DataConfig, resolve_path

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

OPSETS = range(13, 22)
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
FLOAT32 = 1  # onnx.TensorProto.FLOAT
Dim = Union[int, str]
PROTOBUF_LIMIT = 2**31 - 1  # bytes: the most one ONNX file can hold with its weights inside
CONVERSION_ATOL = 1e-3  # max |torch conversion - ONNX file| over the outputs (logits or probabilities)
CONVERSION_IMAGES = 16  # validation images the conversion is checked on, run as one batch


class PretrainedError(ValueError):
    """A user-supplied model file does not fit; the message names the file."""


def file_sha256(path: Path) -> str:
    return sha256_file(resolve_path(path))


@dataclass(frozen=True)
class OnnxInfo:
    input_name: str
    input_dims: List[Dim]
    output_name: str
    output_dims: List[Dim]
    opset: int
    params: int

    @property
    def fixed_batch(self) -> Optional[int]:
        return self.input_dims[0] if isinstance(self.input_dims[0], int) else None


def _dims(value_info) -> List[Dim]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim]


def inspect_onnx(path: Path, input_shape: Optional[Sequence[Optional[int]]] = None,
                 num_classes: Optional[int] = None) -> OnnxInfo:
    """Check that ``path`` is an image classifier edgeopt can take, for images of ``input_shape``
    ([C, H, W]; None where not known yet) and ``num_classes`` classes; raise PretrainedError otherwise."""
    import onnx

    path = resolve_path(path)

    def refuse(reason: str):
        raise PretrainedError(f"{path}: {reason}")

    try:
        m = onnx.load(str(path))
        onnx.checker.check_model(m)
    except Exception as err:  # noqa: BLE001 - any parse/check error is the same answer for the user
        refuse(f"not a valid ONNX model ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})")
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset not in OPSETS:
        refuse(f"opset {opset} is not supported (edgeopt takes opsets {OPSETS.start} to {OPSETS.stop - 1}; "
               f"re-export with opset_version=17)")
    custom = sorted({f"{n.domain}::{n.op_type}" for n in m.graph.node if n.domain not in KNOWN_DOMAINS})
    if custom:
        refuse(f"custom operator {custom[0]}" + (f" (+{len(custom) - 1} more)" if len(custom) > 1 else "")
               + ": the runtimes cannot run it")
    initializers = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        refuse(f"{len(inputs)} inputs ({', '.join(i.name for i in inputs)}): edgeopt takes single-input image classifiers")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    if elem != FLOAT32:
        refuse(f"input '{inp.name}' is {onnx.TensorProto.DataType.Name(elem).lower()}: edgeopt feeds float32 "
               f"normalized images (NCHW); move the cast and normalization out of the model")
    dims = _dims(inp)
    if len(dims) != 4:
        refuse(f"input '{inp.name}' has shape {dims}: expected an image batch [N, C, H, W]")
    if isinstance(dims[3], int) and dims[3] in (1, 3) and not (isinstance(dims[1], int) and dims[1] in (1, 3)):
        refuse(f"input '{inp.name}' {dims} looks channels-last (NHWC): edgeopt feeds NCHW; re-export with the "
               f"channels first")
    if input_shape is not None:
        for axis, (have, want) in enumerate(zip(dims[1:], input_shape), start=1):
            if isinstance(have, int) and want is not None and have != want:
                refuse(f"input '{inp.name}' {dims} does not fit the data's images [N, "
                       f"{', '.join(str(w) if w else '?' for w in input_shape)}] (axis {axis}: {have} vs {want})")
    outputs = list(m.graph.output)
    out_dims = _dims(outputs[0])
    if len(out_dims) != 2:
        refuse(f"output '{outputs[0].name}' has shape {out_dims}: expected [N, classes] (logits or probabilities)")
    if num_classes is not None and isinstance(out_dims[1], int) and out_dims[1] != num_classes:
        refuse(f"output '{outputs[0].name}' has {out_dims[1]} classes; the dataset has {num_classes}")
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    return OnnxInfo(inp.name, dims, outputs[0].name, out_dims, opset, params)


def expected_input(data: DataConfig) -> tuple[List[Optional[int]], Optional[int]]:
    """([C, H, W], classes) of the images a config will load, as far as known without reading them."""
    if data.source == "digits":
        h, w = data.image_size or (8, 8)
        return [1, h, w], 10
    from edgeopt.data.sources import class_folders

    assert data.root is not None  # the config requires it for an ImageFolder
    size: tuple[Optional[int], Optional[int]] = data.image_size or (None, None)
    return [1 if data.grayscale else 3, *size], len(class_folders(resolve_path(data.root)))


def preflight(teacher_onnx: Optional[Path], data: DataConfig) -> Optional[OnnxInfo]:
    """Refuse a brought ONNX model that edgeopt cannot take, before any data is loaded or trained."""
    if teacher_onnx is None:
        return None
    shape, classes = expected_input(data)
    return inspect_onnx(teacher_onnx, shape, classes)


def output_kind(outputs: np.ndarray) -> str:
    """'probabilities' when every row is non-negative and sums to 1 (a softmax inside the model), else 'logits'."""
    rows = outputs.astype(np.float64)
    if rows.min() >= 0 and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3):
        return "probabilities"
    return "logits"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200] if text else 'no message'}"


def _read_state_dict(path: Path) -> Dict:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the loader says, the file is not a state dict
        raise PretrainedError(f"{path}: not a loadable state dict ({first_line(err)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint: {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_teacher(path: Path, arch: Dict, input_shape):
    """Build ``arch`` and load the state dict at ``path`` strictly; explain any mismatch."""
    from edgeopt.models.zoo import build_model

    path = resolve_path(path)
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


def _ort_session(path: Path, what: str, options, named: Path):
    """An ONNX Runtime CPU session on a brought file; whatever stops ORT is a one-line PretrainedError
    naming ``named``."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - what ORT says is the reason
        raise PretrainedError(f"{named}: ONNX Runtime cannot {what} ({first_line(err)})") from None


def _run_file(model_file: Path, x: np.ndarray, named: Path) -> np.ndarray:
    """The outputs of ``model_file`` on ``x`` by ONNX Runtime (any fixed batch); whatever stops ORT,
    creating the session or running it, is a one-line PretrainedError naming ``named``."""
    from edgeopt.runtimes.onnxruntime import OrtPredictor

    try:
        return OrtPredictor(model_file, 0).predict_batched(x)
    except Exception as err:  # noqa: BLE001 - what ORT says is the reason
        raise PretrainedError(f"{named}: ONNX Runtime cannot run it ({first_line(err)})") from None


def _copy_model(path: Path, dst: Path) -> Path:
    """``path`` as one self-contained file at ``dst``: a model with external data gets its weights
    inside (the data files beside the original would not travel with the copy)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    m = onnx.load(str(path), load_external_data=False)
    if not any(uses_external_data(t) for t in m.graph.initializer):
        return Path(shutil.copy2(path, dst))
    m = onnx.load(str(path))  # the data files are read from beside the original, as onnx resolves them
    size = m.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise PretrainedError(f"{path}: its external data make {size / 2**30:.1f} GiB, over the 2 GiB one ONNX file "
                              f"can hold; edgeopt takes models whose weights fit in one file")
    onnx.save(m, str(dst))
    return dst


def onnx_teacher(path: Path, dataset) -> Checkpoint:
    """Wrap a brought ONNX model as a Checkpoint folder (``model.onnx``, external data taken inside),
    after checking it against the dataset and running the copy on validation images (which also
    tells logits from probabilities)."""
    path = resolve_path(path)
    num_classes = len(dataset.classes)
    info = inspect_onnx(path, dataset.input_shape, num_classes)
    x = next(dataset.batches("val", 32))[0]
    out_dir = new_workdir("teacher")
    out = _run_file(_copy_model(path, out_dir / "model.onnx"), x, path)
    if out.shape != (len(x), num_classes):
        raise PretrainedError(f"{path}: output shape {list(out.shape)[1:]} does not fit {num_classes} classes")
    kind = output_kind(out)
    batch = f"fixed batch {info.fixed_batch}" if info.fixed_batch else "dynamic batch"
    log.info("brought ONNX model %s: input '%s' %s (%s), output '%s' %s (%s), opset %d, %d params", path.name,
             info.input_name, info.input_dims, batch, info.output_name, info.output_dims, kind, info.opset, info.params)
    return Checkpoint.write(out_dir, {
        "role": "teacher", "base": "teacher", "source": str(path), "source_sha256": sha256_file(path),
        "arch": {"name": "onnx", "num_classes": num_classes, "in_channels": dataset.input_shape[0], "width": 0},
        "input_shape": list(dataset.input_shape), "params": info.params, "macs": 0, "output": kind,
        "onnx": {"input": info.input_name, "output": info.output_name, "input_dims": info.input_dims,
                 "fixed_batch": info.fixed_batch, "opset": info.opset},
    })


@dataclass(frozen=True)
class Converted:
    """A brought ONNX model as a torch model, and how closely it reproduces the file."""

    model: "nn.Module"
    graph: Path  # the ONNX graph it was converted from (folded; logits out), kept with every checkpoint of it
    max_abs_diff: float  # over the outputs of ``images`` validation images, against the file's own
    images: int
    batches: Tuple[int, ...] = ()  # the batch sizes it was run at for that check

    def describe(self) -> Dict[str, Any]:
        return {"converter": "onnx2torch", "max_abs_diff": self.max_abs_diff, "images": self.images,
                "batches": list(self.batches), "atol": CONVERSION_ATOL}


def _fold_for_torch(path: Path, tmp: Path, output: str, named: Path, input_shape: Sequence[int], batch: int) -> Any:
    """The graph as ONNX Runtime's basic optimizations leave it for an input of [batch, *input_shape]: every
    shape computation folded into constants (e.g. TF "same" padding computed from the image size), standard
    operators only; a final Softmax set aside when the model outputs probabilities."""
    import onnx
    import onnxruntime as ort

    from edgeopt.models.onnx_graph import graph_input, set_dims

    m = onnx.load(str(path))
    set_dims(graph_input(m), [batch, *input_shape])
    onnx.save(m, str(tmp / "fixed.onnx"))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp / "folded.onnx")
    so.log_severity_level = 3
    _ort_session(tmp / "fixed.onnx", "optimize it for the torch conversion", so, named)
    m = onnx.load(str(tmp / "folded.onnx"))
    if output == "probabilities":
        out = m.graph.output[0]
        last = next((n for n in m.graph.node if out.name in n.output), None)
        if last is None or last.op_type != "Softmax":
            raise PretrainedError(f"{named}: outputs probabilities but not from a final Softmax "
                                  f"({last.op_type if last is not None else 'no node'}): structural recipes need "
                                  f"its logits; export it without the normalization")
        m.graph.node.remove(last)
        for n in m.graph.node:
            n.output[:] = [out.name if o == last.input[0] else o for o in n.output]
    return m


REFUSED = "structural recipes need a torch model (bring a state dict for `arch`)"


def _convert(m: Any, batch: int, named: Path) -> "nn.Module":
    """onnx2torch's torch model of the folded graph ``m``, once its batch is a symbol again and its operators
    are in forms onnx2torch takes (``edgeopt.models.onnx_graph``); a node that cannot be made so, or that
    onnx2torch cannot convert, is named in a one-line PretrainedError."""
    from edgeopt.models import onnx_graph
    from edgeopt.models.converted import unconvertible
    from edgeopt.models.zoo import graph_module

    try:
        onnx_graph.to_torch_opset(m)
        changed = onnx_graph.dynamic_batch(m, batch)
        onnx_graph.torch_friendly(m)
    except onnx_graph.GraphError as err:
        raise PretrainedError(f"{named}: cannot be made convertible: {err}; {REFUSED}") from None
    if changed:
        log.info("%s: its fixed batch of %d made dynamic (%d shape constant(s) rewritten)", named.name, batch, changed)
    try:
        return graph_module(m).eval()
    except Exception as err:  # noqa: BLE001 - an operator or pattern onnx2torch does not take
        failed = unconvertible(m)
        at = f" node '{failed[0]}' ({failed[1]})" if failed else ""
        raise PretrainedError(f"{named}: onnx2torch cannot convert{at} ({first_line(failed[2] if failed else err)}); "
                              f"{REFUSED}") from None


def _run_converted(model: "nn.Module", m: Any, x: np.ndarray, output: str, named: Path) -> np.ndarray:
    """The converted model's outputs on ``x`` (probabilities where the file gives them); a failure names the
    node where it happens."""
    import torch

    from edgeopt.models.converted import failing_node, onnx2torch_nodes

    try:
        with torch.inference_mode():
            got = model(torch.from_numpy(x))
            return (torch.softmax(got, 1) if output == "probabilities" else got).numpy()
    except Exception as err:  # noqa: BLE001 - e.g. a shape the graph fixed at another batch size
        failed = failing_node(model, torch.from_numpy(x))
        at = f" at node '{failed[0]}' ({onnx2torch_nodes(m).get(failed[0], '?')})" if failed else ""
        raise PretrainedError(f"{named}: its torch conversion cannot run a batch of {len(x)} images{at} "
                              f"({first_line(failed[1] if failed else err)})") from None


def torch_from_onnx(path: Path, dataset: Dataset, output: str = "logits", atol: float = CONVERSION_ATOL,
                    source: Optional[Path] = None) -> Converted:
    """The brought ONNX model at ``path`` as a torch model giving logits for any batch, checked against the
    file (one image at a time where its batch is fixed) on validation images of ``dataset``, at batch 1
    and at batch ``CONVERSION_IMAGES``; PretrainedError (one line naming ``source``, the user's file, or
    else ``path``, with the node or the difference) if it does not match."""
    import onnx

    from edgeopt.models.onnx_graph import graph_input

    path = resolve_path(path)
    named = Path(source) if source else path
    dims = _dims(graph_input(onnx.load(str(path), load_external_data=False)))
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else 1
    graph = new_workdir("converted") / "graph.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        m = _fold_for_torch(path, Path(tmp), output, named, dataset.input_shape, batch)
    model = _convert(m, batch, named)
    onnx.save(m, str(graph))
    x = next(dataset.batches("val", CONVERSION_IMAGES))[0]
    want = _run_file(path, x, named)
    diff = 0.0
    for rows in (x[:1], x):
        got = _run_converted(model, m, rows, output, named)
        diff = max(diff, float(np.abs(got - want[:len(rows)]).max()) if got.shape == (len(rows), *want.shape[1:])
                   else float("inf"))
        if not diff <= atol:
            raise PretrainedError(f"{named}: its torch conversion differs from the file by {diff:.2e} (> {atol:.0e}) "
                                  f"in the outputs of {len(rows)} validation image{'s' if len(rows) > 1 else ''}; "
                                  f"structural recipes are refused")
    log.info("torch conversion of %s (onnx2torch): max |torch - ONNX| %.1e on %d validation images, at batch 1 and "
             "%d", named.name, diff, len(x), len(x))
    return Converted(model, graph, diff, len(x), (1, len(x)))
