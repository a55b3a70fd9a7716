"""ExecuTorch: the ``executorch`` wheel's runtime (XNNPACK linked in) running a ``.pte`` program.

``Runtime.get().load_program(path).load_method("forward")``, executed on torch tensors (the wheel's
bindings link libtorch). Shapes are static: a program exported at batch 1 runs batch 1
(``fixed_batch``, read from the program). Threads: ExecuTorch has one thread pool per process, set
with the bindings' private ``_unsafe_reset_threadpool``; each predictor sets it to its own count before
it runs (a no-op when this module last set that count), so predictors of one thread count, as in an
evaluation, never reset it between calls.

:func:`read_program` reads what a ``.pte`` runs: the operators left to the portable kernels and, from
each XNNPACK delegate's own graph (its flatbuffer, read with the ``flatc`` the wheel ships), the
nodes XNNPACK runs and the data type of their inputs: the INT8 coverage and the delegated share.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from executorch.extension.pybindings import portable_lib
from executorch.runtime import Runtime

from edgeopt.runtimes import Predictor

# XNNPACK nodes that are layers (convolutions, matmuls), and the data types that make one run in INT8
XNN_LAYERS = frozenset({"XNNConv2d", "XNNDepthwiseConv2d", "XNNConvTranspose2d", "XNNFullyConnected",
                        "XNNBatchMatrixMultiply"})
XNN_INT8 = frozenset({"xnn_datatype_qint8", "xnn_datatype_quint8", "xnn_datatype_qdint8", "xnn_datatype_qpint8"})
# operators that are layers when left to the portable kernels (which compute them in float)
PORTABLE_LAYERS = ("aten::convolution", "aten::linear", "aten::addmm", "aten::mm", "aten::bmm")
_NON_FINITE = re.compile(r"(:\s*-?)(inf|nan)\b")  # flatc writes inf / nan, which JSON spells Infinity / NaN


def kernel_calls(plan: Any) -> List[str]:
    """The operators an execution plan runs outside its delegates, by index (``aten::sort.values``)."""
    return [f"{o.name}.{o.overload}" if o.overload else o.name for o in plan.operators]


_threads: List[int] = []  # the count this process last set (the pool is the process's: one setter, this module)


def set_threads(n: int) -> None:
    if _threads != [n]:
        portable_lib._unsafe_reset_threadpool(n)
        _threads[:] = [n]


class ExecuTorchPredictor(Predictor):
    runtime = "executorch"

    def __init__(self, path: Path, threads: int = 1):
        self.threads = threads
        set_threads(threads)
        self.method = Runtime.get().load_program(Path(path)).load_method("forward")
        self.fixed_batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])
        self.settings = {"threads": portable_lib._threadpool_get_thread_count(), "delegate": "XNNPACK",
                         "version": version("executorch")}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        set_threads(self.threads)
        return self.method.execute((torch.from_numpy(np.ascontiguousarray(x, np.float32)),))[0].numpy()


@dataclass
class ProgramLayers:
    """What a ``.pte`` runs: XNNPACK nodes by (type, input data type), and the portable kernel calls."""

    xnnpack: Counter = field(default_factory=Counter)
    portable: Counter = field(default_factory=Counter)

    @property
    def int8_layers(self) -> int:
        return sum(n for (kind, dtype), n in self.xnnpack.items() if kind in XNN_LAYERS and dtype in XNN_INT8)

    @property
    def float_layers(self) -> int:
        delegated = sum(n for (kind, dtype), n in self.xnnpack.items() if kind in XNN_LAYERS and dtype not in XNN_INT8)
        return delegated + sum(n for op, n in self.portable.items() if op.startswith(PORTABLE_LAYERS))

    @property
    def delegated_fraction(self) -> float:
        """The share of the program's operations that XNNPACK runs (its nodes vs the portable kernel calls)."""
        xnn, portable = sum(self.xnnpack.values()), sum(self.portable.values())
        return xnn / (xnn + portable) if xnn + portable else 0.0


def _xnnpack_graph(payload: bytes) -> Dict[str, Any]:
    """An XNNPACK delegate's payload (XNNHeader + flatbuffer + constants) as the JSON of its schema."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _get_flatc_path

    header = XNNHeader.from_bytes(payload[:XNNHeader.EXPECTED_LENGTH])
    graph = payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
    schema = importlib.resources.files("executorch.backends.xnnpack.serialization") / "schema.fbs"
    with tempfile.TemporaryDirectory() as tmp, importlib.resources.as_file(schema) as fbs:
        (Path(tmp) / "graph.bin").write_bytes(graph)
        subprocess.run([_get_flatc_path(), "--json", "--strict-json", "--defaults-json", "-o", tmp, str(fbs), "--",
                        str(Path(tmp) / "graph.bin")], check=True, capture_output=True)
        text = (Path(tmp) / "graph.json").read_text()
    return json.loads(_NON_FINITE.sub(lambda m: m.group(1) + {"inf": "Infinity", "nan": "NaN"}[m.group(2)], text))


def _xnnpack_nodes(graph: Dict[str, Any]) -> List[tuple]:
    """(node type, data type of its first input) for every node of an XNNPACK graph."""
    dtypes = {}
    for v in graph["xvalues"]:
        tensor = v["xvalue_union"].get("tensor_value", v["xvalue_union"])
        dtypes[tensor.get("id_out")] = tensor.get("datatype")
    nodes = []
    for n in graph["xnodes"]:
        ids = [v for k, v in n["xnode_union"].items() if k in ("input1_id", "input_id")]
        nodes.append((n["xnode_union_type"], dtypes.get(ids[0]) if ids else None))
    return nodes


def read_program(path: Path) -> ProgramLayers:
    from executorch.exir._serialize._program import _extract_delegate_payload, deserialize_pte_binary

    data = Path(path).read_bytes()
    program = deserialize_pte_binary(data).program
    layers = ProgramLayers()
    xnnpack = 0
    for plan in program.execution_plan:
        names = kernel_calls(plan)
        for chain in plan.chains:
            for ins in chain.instructions:
                if hasattr(ins.instr_args, "op_index"):
                    layers.portable[names[ins.instr_args.op_index]] += 1
        xnnpack += sum("xnnpack" in d.id.lower() for d in plan.delegates)
    for i in range(xnnpack):
        payload = _extract_delegate_payload(data, "xnnpack", i)
        if payload is not None:
            layers.xnnpack.update(_xnnpack_nodes(_xnnpack_graph(payload)))
    return layers
