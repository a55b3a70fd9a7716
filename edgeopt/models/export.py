"""Export a base (or shrunk) model to a format, checked against the model itself for numeric parity.

Each format is built from the source it declares (``edgeopt.formats.base.Format.source``): an FP32
ONNX file (a torch model is exported once with ``torch.onnx.export``, dynamic batch axis; a model
brought as ONNX is used as it is) or the torch module itself. Either way the format's own runtime
must reproduce the source model's outputs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeopt import formats
from edgeopt.artifacts import Checkpoint, Dataset, ModelArtifact, model_or_failure, new_workdir
from edgeopt.models.converted import traceable
from edgeopt.models.zoo import load_checkpoint
from edgeopt.runtimes import make_predictor

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "logits"
PARITY_ATOL = 1e-3  # FP32 export vs the source model, max abs difference of the outputs
PARITY_IMAGES = 16


class ParityError(RuntimeError):
    """An exported model does not compute what the source model computes."""


def export_onnx(model: nn.Module, input_shape, path: Path) -> Path:
    """torch.export-based ONNX export with a dynamic batch axis; weights embedded in the one file."""
    model.eval()
    example = torch.zeros(1, *input_shape)
    with traceable(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False,
        )
    assert program is not None  # torch returns the program when no path is given
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path))
    return path


def check_parity(model: nn.Module, predict, x: np.ndarray, atol: float = PARITY_ATOL) -> float:
    """Max |outputs_exported - outputs_source| on ``x``; raise ParityError above ``atol``."""
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    diff = float(np.abs(predict(x) - ref).max())
    if not diff <= atol:
        raise ParityError(f"exported model differs from its source by {diff:.2e} (> {atol:.0e})")
    return diff


def checkpoint_onnx(ckpt: Checkpoint, model: nn.Module, path: Path) -> Path:
    """The FP32 ONNX file of a checkpoint: the brought file itself, or a fresh export of its torch model."""
    if ckpt.onnx_file is not None:
        return Path(shutil.copy2(ckpt.onnx_file, path))
    return export_onnx(model, ckpt.manifest["input_shape"], path)


def torch_of_onnx(ckpt: Checkpoint, dataset: Dataset) -> nn.Module:
    """A base brought as ONNX as the torch model the torch-source formats are built from: its torch
    conversion (a graph module, checked against the file), giving what the file gives (probabilities:
    its final softmax put back into the graph)."""
    from edgeopt.models.brought import torch_from_onnx

    assert ckpt.onnx_file is not None
    output = ckpt.manifest.get("output", "logits")
    model = torch_from_onnx(ckpt.onnx_file, dataset, output, source=ckpt.manifest.get("source")).model
    assert isinstance(model, torch.fx.GraphModule)
    if output == "probabilities":
        graph = model.graph
        out = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(out):
            out.args = (graph.call_function(torch.softmax, (out.args[0], 1)),)
        model.recompile()
    return model


def export_checkpoint(ckpt: Checkpoint, fmt: str, dataset: Dataset, variant: str) -> ModelArtifact:
    """FP32 export of a checkpoint to ``fmt``, named ``variant``, parity-checked on val images."""
    f = formats.get(fmt)
    m = ckpt.manifest
    base = m.get("base", m["role"])
    recipe = {"base": base, "role": m["role"], "shrink": m["tag"] if "shrink" in m else "none", **m.get("shrink", {}),
              "scheme": "fp32", "format": fmt}
    own = ckpt.content_hash[:12]
    lineage = {**m.get("lineage", {}), m["role"]: own, "parent": f"{m['role']}:{own}", "base": base}

    def build() -> ModelArtifact:
        if not m.get("learned", True):
            raise RuntimeError(f"skipped: {m.get('reason') or f'the {base} did not learn'} "
                               f"(val acc {m.get('val_accuracy', float('nan')):.3f})")
        model = load_checkpoint(ckpt)
        out = new_workdir(variant)
        if f.source == "torch":
            source = model if ckpt.onnx_file is None else torch_of_onnx(ckpt, dataset)
            with traceable(source):  # a converted model's shape constants as torch.export reads them
                model_file = f.from_torch(source, m["input_shape"], out)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                model_file = f.from_onnx(checkpoint_onnx(ckpt, model, Path(tmp) / "model.onnx"), out)
        x_val = next(dataset.batches("val", PARITY_IMAGES))[0]
        diff = check_parity(model, make_predictor(f.native_runtime, model_file).predict_batched, x_val)
        art = ModelArtifact.write(out, {
            "variant": variant, "format": fmt, "status": "ok", "recipe": recipe, "lineage": lineage,
            "params": m["params"], "macs": m["macs"], "input_shape": m["input_shape"],
            "output": m.get("output", "logits"), "parity_max_abs_diff": diff, **f.describe(model_file),
        })
        log.info("export: %s %.1f kB (parity %.1e)", variant, art.model_bytes / 1e3, diff)
        return art

    return model_or_failure(build, variant=variant, fmt=fmt, recipe=recipe, lineage=lineage)
