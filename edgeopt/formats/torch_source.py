"""The torch program that the torch-source formats (ExecuTorch, LiteRT) are built from.

``torch.export`` captures the model at batch 1 (the batch an app on a phone runs, and the one these
runtimes plan their memory for), in eval mode, as an ExportedProgram. It is written with
``torch.export.save`` as ``source.pt2``: the LiteRT converter reads it in its own environment (one
torch version on both sides), and the ExecuTorch recipes rebuild their INT8 and FP16 programs from it
(a lowered ``.pte`` cannot be quantized again).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Tuple

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.export import ExportedProgram

SOURCE = "source.pt2"  # beside the model file; not a model.* file, so never in a deploy bundle
# how torch's and the converters' messages name an operator: aten.adaptive_max_pool2d.default, aten::sort.values
OPERATOR = re.compile(r"\b(aten(?:\.|::)[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")


class UnsupportedOperator(RuntimeError):
    """A format's converter or runtime cannot take one of the model's operators (the message names it)."""


def export_program(model: "nn.Module", input_shape: Sequence[int]) -> "ExportedProgram":
    """The model as torch.export captures it at batch 1 (float32 input of ``1 x input_shape``)."""
    import torch

    with torch.no_grad():
        return torch.export.export(model.eval(), (torch.zeros(1, *input_shape),))


def save_program(model: "nn.Module", input_shape: Sequence[int], path: Path) -> "ExportedProgram":
    import torch

    program = export_program(model, input_shape)
    torch.export.save(program, str(path))
    return program


def load_program(path: Path) -> Tuple["nn.Module", "torch.Tensor"]:
    """The saved program as a module that torch.export can capture again (PT2E, a cast wrapper), and
    the input it was exported with."""
    import torch

    program = torch.export.load(str(path))
    (example,), _ = program.example_inputs
    return program.module(), example


def operator_named(text: str) -> str | None:
    """The first ATen operator a converter's message names, or None."""
    m = OPERATOR.search(text)
    return m.group(1) if m else None
