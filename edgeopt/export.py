"""Export a torch model to ONNX and to OpenVINO IR, each checked against torch for numeric parity."""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import torch
from torch import nn

from edgeopt.artifacts import Checkpoint, Dataset, ModelArtifact, model_or_failure, new_workdir
from edgeopt.models import load_checkpoint

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "logits"
PARITY_ATOL = 1e-3  # FP32 export vs torch, max abs difference of logits


class ParityError(RuntimeError):
    """An exported model does not compute what the torch model computes."""


def export_onnx(model: nn.Module, input_shape, path: Path) -> Path:
    """torch.export-based ONNX export with a dynamic batch axis; weights embedded in the one file."""
    model.eval()
    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False,
        )
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path))
    return path


def onnx_to_openvino(onnx_path: Path, xml_path: Path, compress_to_fp16: bool = False) -> Path:
    """Convert an ONNX file to IR (``.xml`` + ``.bin``). FP32 weights unless ``compress_to_fp16``."""
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path


def check_parity(model: nn.Module, predict, x: np.ndarray, atol: float = PARITY_ATOL) -> float:
    """Max |logits_exported - logits_torch| on ``x``; raise ParityError above ``atol``."""
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    diff = float(np.abs(predict(x) - ref).max())
    if not diff <= atol:
        raise ParityError(f"exported model differs from torch by {diff:.2e} (> {atol:.0e})")
    return diff


def variant_id(tag: str, scheme: str, fmt: str) -> str:
    """E.g. ``teacher-fp32-onnx``, ``p50-int8-openvino`` (a student pruned by 50 %), ``lr90-fp16-onnx``."""
    return f"{tag}-{scheme}-{fmt}"


def export_checkpoint(ckpt: Checkpoint, fmt: str, dataset: Dataset) -> ModelArtifact:
    """FP32 export of a checkpoint to ``fmt`` ('onnx' or 'openvino'), parity-checked on val images."""
    from edgeopt.runtimes import make_predictor

    tag = ckpt.manifest.get("tag", ckpt.role)
    variant = variant_id(tag, "fp32", fmt)
    recipe = {"role": ckpt.role, "shrink": tag, **ckpt.manifest.get("shrink", {}), "scheme": "fp32", "format": fmt}
    own = ckpt.content_hash[:12]
    lineage = {**ckpt.manifest.get("lineage", {}), ckpt.role: own, "parent": f"{ckpt.role}:{own}"}

    def build() -> ModelArtifact:
        model = load_checkpoint(ckpt)
        out = new_workdir(variant)
        x_val = dataset.split("val")[0][:64]

        def to_onnx(path: Path) -> Path:  # a teacher brought as ONNX is already exported
            if ckpt.manifest.get("format") == "onnx":
                return Path(shutil.copy2(ckpt.path / "model.onnx", path))
            return export_onnx(model, ckpt.manifest["input_shape"], path)

        if fmt == "onnx":
            to_onnx(out / "model.onnx")
            runtime = "onnxruntime"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                onnx_to_openvino(to_onnx(Path(tmp) / "model.onnx"), out / "model.xml")
            runtime = "openvino"
        diff = check_parity(model, make_predictor(runtime, out / ("model.onnx" if fmt == "onnx" else "model.xml")), x_val)
        art = ModelArtifact.write(out, {
            "variant": variant, "format": fmt, "status": "ok", "recipe": recipe, "lineage": lineage,
            "params": ckpt.manifest["params"], "macs": ckpt.manifest["macs"], "input_shape": ckpt.manifest["input_shape"],
            "parity_max_abs_diff": diff, "opset": _opset(out / "model.onnx") if fmt == "onnx" else None,
        })
        log.info("export: %s %.1f kB (parity %.1e)", variant, art.model_bytes / 1e3, diff)
        return art

    return model_or_failure(build, variant=variant, fmt=fmt, recipe=recipe, lineage=lineage)


def _opset(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
