"""The graph of a brought ONNX model made ready for onnx2torch.

An ordinary export fixes its batch (most often 1) in its shape constants (a Reshape's ``[1, -1]``) and
writes operators in forms onnx2torch 1.5 does not take (the axes of ReduceMean as an input from opset
18, ``allowzero`` Reshapes, operator versions past 17). Once ``edgeopt.models.brought`` has folded the
graph for a fixed input shape (every shape computed at run time, e.g. TF "same" padding, now a
constant), these steps, in this order, fix that:

* :func:`to_torch_opset`: operators in their opset-17 forms (reduction axes as attributes), the graph
  declared at opset 17; a node that has no such form is refused by name (GraphError).
* :func:`dynamic_batch`: the input's batch becomes a symbol, and every Reshape (or Expand) whose shape
  constant starts with the fixed batch, on a tensor that carries the batch, copies it instead.
* :func:`torch_friendly`: a Reshape that flattens each image becomes a Flatten (one that only adds
  1s an Unsqueeze), a MatMul (+ Add) head a Gemm: onnx2torch makes them ``torch.flatten`` and an
  ``nn.Linear``, which fix no channel count (pruning changes them) and which the fine-tune trains.

The torch side (naming a failing node, exporting the conversion) is ``edgeopt.models.converted``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

BATCH = "batch"  # the symbol the input's first axis becomes
TORCH_OPSET = 17  # the newest opset whose operator versions onnx2torch converts
# Operators whose opset-18 versions take the reduction axes as an input (ReduceSum did from 13 on).
AXES_INPUT_REDUCTIONS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                         "ReduceLogSumExp", "ReduceSumSquare"}
# Attributes the operators gained after opset 17: dropped where they have the value that behaves as the
# older form did, else the node is refused.
NEWER_ATTRIBUTES: Dict[str, Dict[str, Callable[[Any], bool]]] = {
    **{op: {"noop_with_empty_axes": lambda v: v == 0} for op in AXES_INPUT_REDUCTIONS},
    "Resize": {"antialias": lambda v: v == 0, "keep_aspect_ratio_policy": lambda v: v == b"stretch",
               "axes": lambda v: False},
    "AveragePool": {"dilations": lambda v: set(v) == {1}},
    "Split": {"num_outputs": lambda v: False},
    "Cast": {"saturate": lambda v: True},
}
NEWER_VALUES = {("Pad", "mode"): b"wrap", ("Resize", "coordinate_transformation_mode"): b"half_pixel_symmetric"}
Dims = List[Any]  # int, the batch symbol, or None where unknown


class GraphError(ValueError):
    """A node of the graph that edgeopt cannot make convertible; the message names it."""


def where(node: onnx.NodeProto) -> str:
    return f"node '{node.name or node.output[0]}' ({node.op_type})"


def opset_of(m: onnx.ModelProto) -> int:
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)


def graph_input(m: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {i.name for i in m.graph.initializer}
    return next(i for i in m.graph.input if i.name not in initializers)


def set_dims(value: onnx.ValueInfoProto, dims: List[Any]) -> None:
    """Give ``value`` the shape ``dims`` (ints, or strings for symbols)."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        if isinstance(d, str):
            shape.dim.add().dim_param = d
        else:
            shape.dim.add().dim_value = int(d)


def _constants(m: onnx.ModelProto) -> Dict[str, np.ndarray]:
    """The graph's constant tensors by name; Constant nodes become initializers on the way."""
    for node in [n for n in m.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]:
        t = copy.deepcopy(node.attribute[0].t)
        t.name = node.output[0]
        m.graph.initializer.append(t)
        m.graph.node.remove(node)
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def _unique(m: onnx.ModelProto, name: str) -> str:
    taken = {i.name for i in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
    while name in taken:
        name += "_"
    return name


def _set_constant(m: onnx.ModelProto, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
    """Feed ``node``'s input ``index`` a new initializer (a shared one is left as the other nodes use it)."""
    name = _unique(m, f"{node.name or node.output[0]}_input{index}")
    m.graph.initializer.append(numpy_helper.from_array(value, name))
    node.input[index] = name


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    for init in [i for i in m.graph.initializer if i.name not in used]:
        m.graph.initializer.remove(init)


def _shapes(m: onnx.ModelProto) -> Dict[str, Dims]:
    """Every tensor's dims as ONNX shape inference gives them (the batch symbol where it carries)."""
    probe = copy.deepcopy(m)
    del probe.graph.value_info[:]
    probe = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    out = {}
    for v in [*probe.graph.input, *probe.graph.value_info, *probe.graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    for i in m.graph.initializer:
        out[i.name] = list(i.dims)
    return out


def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def _remove_attribute(node: onnx.NodeProto, name: str) -> None:
    for a in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(a)


def to_torch_opset(m: onnx.ModelProto) -> None:
    """Operators in the forms onnx2torch converts, in place: Reshapes without ``allowzero`` where their
    shape has no 0, and a graph past opset 17 declared at 17 with its reductions' axes as attributes;
    GraphError naming the node where that would change what it computes."""
    consts = _constants(m)
    for node in m.graph.node:
        if node.op_type == "Reshape" and _attribute(node, "allowzero", 0):
            shape = consts.get(node.input[1])
            if shape is None or 0 in shape:
                raise GraphError(f"{where(node)}: allowzero=1 with a shape that has or may have a 0")
            _remove_attribute(node, "allowzero")
    if opset_of(m) <= TORCH_OPSET:
        return
    for node in m.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            onnx.defs.get_schema(node.op_type, TORCH_OPSET, "")
        except onnx.defs.SchemaError:
            raise GraphError(f"{where(node)}: the operator came after opset {TORCH_OPSET}, which onnx2torch "
                             f"does not reach") from None
        if node.op_type in AXES_INPUT_REDUCTIONS and len(node.input) > 1 and node.input[1]:
            axes = consts.get(node.input[1])
            if axes is None:
                raise GraphError(f"{where(node)}: its axes are computed at run time")
            del node.input[1:]
            if axes.size:
                node.attribute.append(helper.make_attribute("axes", [int(a) for a in axes.reshape(-1)]))
        if node.op_type == "Pad" and len(node.input) > 3 and node.input[3]:
            raise GraphError(f"{where(node)}: pads given for some axes only (opset 18's axes input)")
        for name, keeps in NEWER_ATTRIBUTES.get(node.op_type, {}).items():
            value = _attribute(node, name)
            if value is not None and not keeps(value):
                raise GraphError(f"{where(node)}: {name}={value!r} (opset {opset_of(m)}) has no opset-17 form")
            _remove_attribute(node, name)
        for (op, name), value in NEWER_VALUES.items():
            if node.op_type == op and _attribute(node, name) == value:
                raise GraphError(f"{where(node)}: {name}={value.decode()} (opset {opset_of(m)}) has no opset-17 form")
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = TORCH_OPSET
    _drop_unused_initializers(m)
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as err:
        raise GraphError(f"not valid at opset {TORCH_OPSET} ({str(err).strip().splitlines()[0][:200]})") from None


def dynamic_batch(m: onnx.ModelProto, batch: int) -> int:
    """Make the batch of a graph fixed at ``batch`` a symbol, in place: the input's and the output's first
    axis, and the Reshape (and Expand) shape constants that start with ``batch`` on a tensor carrying the
    batch (a Reshape's 0 copies it, an Expand's 1 keeps it). Returns how many constants changed."""
    consts = _constants(m)
    for value in (graph_input(m), *m.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            set_dims(value, [BATCH, *[d.dim_param or d.dim_value for d in dims[1:]]])
    del m.graph.value_info[:]
    changed = 0
    for _ in range(len(m.graph.node) + 1):  # each pass lets the batch reach further; usually 1 or 2
        shapes, before = _shapes(m), changed
        for node in m.graph.node:
            if node.op_type not in ("Reshape", "Expand") or node.input[1] not in consts:
                continue
            target, data = consts[node.input[1]], shapes.get(node.input[0]) or [None]
            if target.ndim != 1 or not target.size or target[0] != batch or data[0] != BATCH:
                continue
            new = target.copy()
            if node.op_type == "Reshape":
                new[0] = 0
                _remove_attribute(node, "allowzero")  # to_torch_opset has refused it where the shape has a 0
            elif batch > 1 and len(target) == len(data):
                new[0] = 1
            else:
                continue
            _set_constant(m, node, 1, new)
            consts[node.input[1]] = new
            changed += 1
        if changed == before:
            break
    _drop_unused_initializers(m)
    return changed


def _resolved(data: Dims, target: np.ndarray) -> Optional[List[Any]]:
    """The dims a Reshape of ``data`` ([batch, known dims...]) to ``target`` gives, the batch first, where
    it keeps the batch first and all else is known."""
    if data[:1] != [BATCH] or not all(isinstance(d, int) for d in data[1:]):
        return None
    size, out = int(np.prod(data[1:])), [data[i] if t == 0 else int(t) for i, t in enumerate(target)]
    rest = out[1:]
    if out[0] == -1 and -1 not in rest and int(np.prod(rest)) == size:
        out[0] = BATCH
    elif out[0] == BATCH and rest.count(-1) == 1:
        known = int(np.prod([d for d in rest if d != -1]))
        out[1 + rest.index(-1)] = size // known if known and size % known == 0 else -1
    if out[0] != BATCH or -1 in out[1:] or int(np.prod(out[1:])) != size:
        return None
    return out


def _unsqueezed(data: Dims, out: List[Any]) -> Optional[List[int]]:
    """The axes where ``out`` inserts 1s into ``data``, if that is all it does."""
    axes, j = [], 0
    for i, d in enumerate(out):
        if j < len(data) and d == data[j]:
            j += 1
        elif d == 1:
            axes.append(i)
        else:
            return None
    return axes if j == len(data) and axes else None


def _gemm(node: onnx.NodeProto, m: onnx.ModelProto, consts: Dict[str, np.ndarray], shapes: Dict[str, Dims],
          consumers: Dict[str, List[onnx.NodeProto]]) -> Optional[Tuple[onnx.NodeProto, Optional[onnx.NodeProto]]]:
    """A Gemm for a MatMul of a 2-D tensor by a constant matrix, with the Add of a constant bias it feeds
    (then also returned, to drop)."""
    weight = consts.get(node.input[1])
    if weight is None or weight.ndim != 2 or len(shapes.get(node.input[0]) or []) != 2:
        return None
    inputs, out, add = [node.input[0], node.input[1]], node.output[0], None
    users = consumers.get(out, [])
    if len(users) == 1 and users[0].op_type == "Add" and out not in {o.name for o in m.graph.output}:
        bias = consts.get(users[0].input[1] if users[0].input[0] == out else users[0].input[0])
        if bias is not None and bias.size == weight.shape[1] and bias.ndim <= 2:
            inputs.append(_unique(m, f"{node.name or out}_bias"))
            m.graph.initializer.append(numpy_helper.from_array(bias.reshape(-1), inputs[-1]))
            out, add = users[0].output[0], users[0]
    return helper.make_node("Gemm", inputs, [out], name=node.name), add


def torch_friendly(m: onnx.ModelProto) -> None:
    """In place, with the batch a symbol: a Reshape that flattens each image ([N, ...] -> [N, rest]) becomes
    Flatten(axis=1), one that only inserts 1s an Unsqueeze, and a MatMul of a 2-D tensor by a constant
    matrix (with the Add of a constant bias) a Gemm. onnx2torch makes them torch.flatten, torch.unsqueeze
    and nn.Linear, which do not fix the channel counts (pruning changes them) and which the fine-tune trains."""
    consts, shapes = _constants(m), _shapes(m)
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in m.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    nodes, dropped = [], set()
    for node in m.graph.node:
        if id(node) in dropped:
            continue
        data = (shapes.get(node.input[0]) if node.input else None) or [None]
        reshape = node.op_type == "Reshape" and node.input[1] in consts
        out = _resolved(data, consts[node.input[1]]) if reshape else None
        axes = _unsqueezed(data, out) if out is not None else None
        if out is not None and len(out) == 2 and len(data) > 2:
            node = helper.make_node("Flatten", [node.input[0]], list(node.output), name=node.name, axis=1)
        elif axes is not None:
            axes_name = _unique(m, f"{node.name or node.output[0]}_axes")
            m.graph.initializer.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
            node = helper.make_node("Unsqueeze", [node.input[0], axes_name], list(node.output), name=node.name)
        elif node.op_type == "MatMul":
            gemm = _gemm(node, m, consts, shapes, consumers)
            if gemm is not None:
                node = gemm[0]
                if gemm[1] is not None:
                    dropped.add(id(gemm[1]))
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _drop_unused_initializers(m)
