"""The torch model onnx2torch makes of a brought ONNX graph: where it fails, and how it exports.

onnx2torch names each module after its ONNX node (:func:`onnx2torch_nodes`), so a conversion or a run
that fails is told by node (:func:`unconvertible`, :func:`failing_node`). It passes shape constants
(a Reshape's shape, a Pad's pads, a Slice's bounds, a Squeeze's axes) to its modules as tensors, which
``torch.export`` cannot read: within :func:`traceable` the model runs them as Python values instead,
with the same outputs and state dict, and exports. The graph surgery before the conversion is
``edgeopt.models.onnx_graph``.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    import onnx
    from torch import nn


def onnx2torch_nodes(m: "onnx.ModelProto") -> Dict[str, str]:
    """The op type of each node by the name onnx2torch gives its module (the node's name, '.' -> '/')."""
    from onnx2torch.onnx_graph import OnnxGraph

    return {name: node.operation_type for name, node in OnnxGraph(m.graph).nodes.items()}


def unconvertible(m: "onnx.ModelProto") -> Optional[Tuple[str, str, BaseException]]:
    """The first node onnx2torch cannot convert (its module name, op type and the error), if any."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph

    opsets = {o.domain: o.version for o in m.opset_import}
    graph = OnnxGraph(m.graph)
    for name, node in graph.nodes.items():
        try:
            get_converter(domain=node.domain, operation_type=node.operation_type,
                          version=opsets[node.domain])(node, graph)
        except Exception as err:  # noqa: BLE001 - whatever stops the converter is the reason
            return name, node.operation_type, err
    return None


def failing_node(model: "nn.Module", x: Any) -> Optional[Tuple[str, BaseException]]:
    """The module name of the first node of ``model`` that raises on input ``x``, with the error."""
    import torch

    class Locate(torch.fx.Interpreter):
        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception as err:  # noqa: BLE001 - we only name where it fails
                raise _At(str(n.target), err) from None

    if not isinstance(model, torch.fx.GraphModule):
        return None
    try:
        with torch.inference_mode():
            Locate(model).run(x)
    except _At as at:
        return at.target, at.error
    return None


class _At(Exception):
    def __init__(self, target: str, error: BaseException):
        super().__init__(target)
        self.target, self.error = target, error


def _static_reshape(x, shape: List[int]):
    return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])


def _static_pad(x, pads: List[int], mode: str, value: float):
    import torch.nn.functional as F

    return F.pad(x, pads, mode=mode, value=value)


def _static_slice(x, slices: List[Tuple[int, slice]]):
    index: List[Any] = [slice(None)] * x.dim()
    for axis, s in slices:
        index[axis] = s
    return x[tuple(index)]


def _static_squeeze(x, axes: Optional[List[int]]):
    return x.squeeze() if not axes else x.squeeze(tuple(axes))


def _static_unsqueeze(x, axes: List[int]):
    for a in sorted(a if a >= 0 else a + x.dim() + len(axes) for a in axes):
        x = x.unsqueeze(a)
    return x


def _static_expand(x, shape: List[int]):
    import torch

    return x.expand(torch.broadcast_shapes(x.shape, tuple(shape)))


def _torch_pads(onnx_pads: List[int], mode: str) -> List[int]:
    """ONNX pads ([begin per axis..., end per axis...]) as F.pad takes them (last axis first), without
    the leading axes' zero pairs that non-constant modes refuse."""
    n = len(onnx_pads) // 2
    pads = [v for axis in reversed(range(n)) for v in (onnx_pads[axis], onnx_pads[axis + n])]
    while mode != "constant" and len(pads) > 2 and pads[-2:] == [0, 0]:
        pads = pads[:-2]
    return pads


def _slices(starts, ends, axes=None, steps=None) -> Optional[List[Tuple[int, slice]]]:
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if any(s <= 0 for s in steps):
        return None  # a reversed slice stays as onnx2torch wrote it
    return [(a, slice(b, e, s)) for b, e, a, s in zip(starts, ends, axes, steps)]


Frozen = Optional[Tuple[Callable, tuple]]  # a Python function and its constant arguments after the tensor


def _freeze_pad(mod: Any, pads: List[int], value: Any = None) -> Frozen:
    return _static_pad, (_torch_pads(pads, str(mod.mode)), str(mod.mode), 0.0 if value is None else float(value))


def _freeze_slice(mod: Any, *bounds: Any) -> Frozen:
    slices = _slices(*bounds)
    return None if slices is None else (_static_slice, (slices,))


# onnx2torch module class -> its call as a Python function of the tensor, from the module and the constant
# tensors it was called with (as Python values); None where the call must stay as it is.
FREEZERS: Dict[str, Callable[..., Frozen]] = {
    "OnnxReshape": lambda mod, shape: (_static_reshape, (shape,)),
    "OnnxPadDynamic": _freeze_pad,
    "OnnxSlice": _freeze_slice,
    "OnnxSqueezeDynamicAxes": lambda mod, axes=None: (_static_squeeze, (axes,)),
    "OnnxUnsqueezeDynamicAxes": lambda mod, axes: (_static_unsqueeze, (axes,)),
    "OnnxExpand": lambda mod, shape: (_static_expand, (shape,)),
}


@contextlib.contextmanager
def traceable(model: "nn.Module") -> Iterator["nn.Module"]:
    """Within the block, a model onnx2torch made runs a copy of its graph whose shape arguments (Reshape's
    shape, Pad's pads, Slice's bounds, Squeeze's axes...) are Python values, which torch.export can
    trace (it refuses to read them from tensors); its own graph is back after. Same outputs, same state
    dict, same modules and hooks. Any other model is left as it is."""
    import torch

    if not isinstance(model, torch.fx.GraphModule):
        yield model
        return
    own, graph = model.graph, copy.deepcopy(model.graph)
    graph.owning_module = model

    def constant(arg) -> Optional[list]:
        return operator.attrgetter(arg.target)(model).tolist() if getattr(arg, "op", None) == "get_attr" else None

    for node in list(graph.nodes):
        freeze = FREEZERS.get(type(model.get_submodule(node.target)).__name__) if node.op == "call_module" else None
        if freeze is None:
            continue
        args = [*node.args, *node.kwargs.values()]
        values = [constant(a) for a in args[1:]]
        if not values or any(v is None for v in values):
            continue
        frozen = freeze(model.get_submodule(node.target), *values)
        if frozen is None:
            continue
        with graph.inserting_before(node):
            call = graph.call_function(frozen[0], (args[0], *frozen[1]))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    model.graph = graph  # recompiles
    try:
        yield model
    finally:
        model.graph = own
