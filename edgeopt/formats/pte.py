"""ExecuTorch: one ``model.pte`` program lowered to XNNPACK; read by the ExecuTorch runtime.

Built from the torch module (``source = "torch"``): ``torch.export`` at batch 1, then
``to_edge_transform_and_lower`` with the XNNPACK partitioner; what XNNPACK does not take runs on the
runtime's portable kernels. The torch program is kept beside the file (``source.pt2``): the INT8 and
FP16 recipes (``edgeopt.precisions.pt2e``) rebuild their programs from it.

An operator that cannot reach the runtime fails the variant with the operator named: one outside the
Core ATen opset (``to_edge`` refuses it), or one left outside XNNPACK for which the runtime has no
kernel (the program would lower, then fail at ``load_method`` with ``OperatorMissing``: checked here,
against the kernels the installed runtime registers).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Sequence

from edgeopt.formats.base import Format
from edgeopt.formats.torch_source import SOURCE, UnsupportedOperator, operator_named, save_program

if TYPE_CHECKING:
    from torch import nn
    from torch.export import ExportedProgram


def _first_line(err: BaseException) -> str:
    return next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)


def lower(program: "ExportedProgram", dst: Path) -> Path:
    """Lower a torch program to XNNPACK and write the ``.pte``; an operator the runtime cannot run raises
    :class:`UnsupportedOperator` naming it."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _get_operator_names

    from edgeopt.runtimes.executorch import kernel_calls

    try:
        et = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as err:
        op = operator_named(str(err))
        if op is None:
            raise
        raise UnsupportedOperator(f"ExecuTorch cannot take operator {op}: {_first_line(err)[:200]}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "This API is experimental": the runtime's own list of its kernels
        kernels = set(_get_operator_names())
    missing = [op for plan in et.executorch_program.execution_plan for op in kernel_calls(plan) if op not in kernels]
    if missing:
        raise UnsupportedOperator(f"ExecuTorch cannot run operator {missing[0]}: XNNPACK does not take it and the "
                                  f"runtime has no kernel for it")
    dst.write_bytes(et.buffer)
    return dst


class ExecuTorchFormat(Format):
    name = "executorch"
    source = "torch"
    runtimes = ("executorch",)
    model_filename = "model.pte"

    def from_torch(self, model: "nn.Module", input_shape: Sequence[int], folder: Path) -> Path:
        program = save_program(model, input_shape, Path(folder) / SOURCE)
        return lower(program, self.model_file(folder))

    def describe(self, model_file: Path) -> Dict[str, Any]:
        from edgeopt.runtimes.executorch import read_program

        return {"delegated_fraction": read_program(model_file).delegated_fraction}
