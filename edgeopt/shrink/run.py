"""Shrink a base model with one structural technique, then recover its accuracy by KD.

The same sequence for every technique (``edgeopt.shrink.base``): load the base, ``apply`` the
technique, export the changed model to ONNX once (a model that does not export is refused here, in
seconds, not after its fine-tune), fine-tune with knowledge distillation from the KD teacher (for a
distilled student, the teacher; for the teacher or a brought model, the original model itself), run
the technique's after-fine-tune hook, save. A base brought as ONNX is shrunk as its torch conversion,
checked against the file first (``edgeopt.models.brought.torch_from_onnx``); a conversion that is
refused leaves its variants unbuilt, with the refusal as their reason. Usable from a notebook::

    shrunk = shrink_base(student, teacher, dataset, "prune", 0.5, PruneOptions(amounts=[0.5]))
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import re
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

import numpy as np
import torch

from edgeopt.artifacts import Checkpoint, Dataset, new_workdir
from edgeopt.config import FitConfig, KDConfig
from edgeopt.models.brought import Converted, PretrainedError, first_line, torch_from_onnx
from edgeopt.models.export import export_onnx
from edgeopt.models.zoo import (
    CONVERTED,
    add_batchnorm,
    calibrate_batchnorm,
    count_macs_params,
    graph_module,
    load_checkpoint,
    save_checkpoint,
)
from edgeopt.shrink.base import ShrinkContext, TechniqueOptions, get
from edgeopt.train.features import FeatureKD, shape_kept_layers
from edgeopt.train.fit import fit, seed_everything

log = logging.getLogger(__name__)

BN_CALIBRATION_BATCHES = 10  # un-augmented train batches of 32 that set the BatchNorms a converted model gets back


def calibration_batches(dataset: Dataset, n: int) -> List[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(x)) for x, _ in itertools.islice(dataset.batches("train", 32), n)]


def finetune_config(train_config: dict, opts: TechniqueOptions) -> FitConfig:
    """The base's own training settings (batch size, optimizer, augmentation ...; for a brought model,
    the teacher section's), run for the technique's fine-tune steps (or epochs) at its learning rate."""
    own = {k: v for k, v in train_config.items() if k in FitConfig.model_fields}
    return FitConfig.model_validate({**own, "epochs": max(1, opts.finetune_epochs), "steps": opts.finetune_steps,
                                     "lr": opts.lr})


def export_refusal(model: torch.nn.Module, input_shape) -> Optional[str]:
    """Why ``model`` (as a technique changed it) does not export to ONNX, or None when it does: the
    same export its variants get, tried once before any fine-tune is spent on it."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_onnx(model, input_shape, Path(tmp) / "model.onnx")
        except Exception as err:  # noqa: BLE001 - whatever stops the export is the reason
            return f"the changed model does not export to ONNX ({_export_error(err)}); found before its fine-tune"
    return None


def _export_error(err: BaseException) -> str:
    """One line of what stopped torch.onnx.export: torch.export's own summary of the cause (and the node
    it was executing) where it gives one, else the error's first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if "## Exception summary" not in text:
        return first_line(err)
    lines = [line.strip() for line in text.split("## Exception summary", 1)[1].splitlines() if line.strip()]
    cause = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>", r"\1", lines[0])[:200] if lines else "no message"
    node = next((re.search(r"target=([^\]]+)\]", line) for line in lines if line.startswith("While executing")), None)
    return f"{type(err).__name__}: {cause}" + (f" at node '{node.group(1)}'" if node else "")


# the last base converted in this process: (its content hash, the data's) -> (the conversion, its model with
# the BatchNorms back and calibrated; its graph's bytes; its MACs with the BatchNorms folded)
_converted: Dict[Tuple[str, str], Tuple[Converted, bytes, int]] = {}


def converted_base(base: Checkpoint, dataset: Dataset) -> Tuple[Converted, int]:
    """A brought ONNX base as its torch conversion (:func:`torch_from_onnx`) with a calibrated BatchNorm
    after every convolution, its graph in a new workdir, and the conversion's MACs (BatchNorms folded).
    Converted and calibrated once per process for a base and data: a run's amounts and a search's trials
    each start from a copy (on EfficientNet-Lite1 at 240x240 the calibration alone took 48 s of a search
    trial's 127 s probe)."""
    key = (base.content_hash, dataset.data_hash)
    if key not in _converted:
        m = base.manifest
        assert base.onnx_file is not None
        conv = torch_from_onnx(base.onnx_file, dataset, m.get("output", "logits"), source=m.get("source"))
        macs = count_macs_params(conv.model, m["input_shape"])[0]
        calibrate_batchnorm(conv.model, add_batchnorm(conv.model), calibration_batches(dataset, BN_CALIBRATION_BATCHES))
        _converted.clear()
        _converted[key] = (conv, conv.graph.read_bytes(), macs)
    conv, graph_bytes, macs = _converted[key]
    graph = new_workdir("converted") / "graph.onnx"
    graph.write_bytes(graph_bytes)
    return dataclasses.replace(conv, model=copy.deepcopy(conv.model), graph=graph), macs


def feature_kd(model: torch.nn.Module, load_base: Callable[[], torch.nn.Module], input_shape,
               weight: float) -> Optional[FeatureKD]:
    """Feature distillation from the unchanged base for the layers whose output kept its shape, or None
    (off, or no such layer)."""
    if not weight:
        return None
    base = load_base()
    layers = shape_kept_layers(model, base, input_shape)
    return FeatureKD(base, layers, weight) if layers else None


def shrink_base(base: Checkpoint, kd_teacher: Checkpoint, dataset: Dataset, technique: str, amount: float,
                opts: TechniqueOptions, seed: int = 0, *, eval_at: Collection[int] = (),
                on_eval: Optional[Callable[[int, float], bool]] = None, export_checked: bool = False) -> Checkpoint:
    """``technique`` at ``amount`` on ``base``, KD fine-tuned from ``kd_teacher``; the Checkpoint records
    MACs and params before and after, the recipe and the lineage. A base that did not learn is not
    shrunk: the result says so and its variants are skipped. ``eval_at`` and ``on_eval`` go to the
    fine-tune's ``fit`` (a search's rungs: evaluated there, and stopped there by the caller).
    ``export_checked``: this structure was exported already (a search trial's probe built its every
    format), so the export is not tried again before the fine-tune."""
    t = get(technique)
    m = base.manifest
    tag, base_name, train = t.variant_tag(amount), m.get("base", m["role"]), m.get("train_config") or {}
    lineage = {**m.get("lineage", {}), m["role"]: base.content_hash[:12]}
    info: Dict[str, Any] = {"tag": tag, "base": base_name, "lineage": lineage,
                            "shrink": {"technique": technique, "amount": amount},
                            "recipe_text": t.recipe(amount, opts)}

    def unbuilt(reason: str) -> Checkpoint:
        return Checkpoint.write(new_workdir(t.role), {"role": t.role, **info, "learned": False, "reason": reason})

    if not m.get("learned", True):
        return unbuilt(f"the base {m['role']} did not learn")
    arch, graph, load_base, before = m["arch"], None, lambda: load_checkpoint(base), m["macs"]
    if base.onnx_file is not None:
        try:
            converted, before = converted_base(base, dataset)
        except PretrainedError as err:
            log.warning("shrink: %s %s not built: %s", base_name, tag, err)
            return unbuilt(str(err))
        model, graph, arch = converted.model, converted.graph, {**arch, "name": CONVERTED, "batchnorm": True}
        info["conversion"] = converted.describe()
        load_base = partial(graph_module, converted.graph)  # the converted model as it was (BatchNorms folded)
    else:
        model = load_checkpoint(base)
    seed_everything(seed)
    ctx = ShrinkContext(dataset=dataset, input_shape=m["input_shape"], num_classes=arch["num_classes"],
                        seed=seed, load_base=load_base)
    applied, after = t.apply(model, amount, opts, ctx)
    val_acc = None
    if opts.finetune_epochs or opts.finetune_steps:
        refusal = None if export_checked else export_refusal(model, m["input_shape"])
        if refusal is not None:  # found in seconds, not after the fine-tune
            log.warning("shrink: %s %s not built: %s", base_name, tag, refusal)
            return unbuilt(refusal)
        features = feature_kd(model, load_base, m["input_shape"], opts.feature_kd)
        if features is not None:
            info["recipe_text"] += f", feature KD on {len(features.layers)} layers"
            applied["feature_kd_layers"] = len(features.layers)
        # the base is the KD teacher (a teacher's or a brought model's own shrink): its torch module serves
        # the logits and the features in one pass
        teacher = (features.teacher if features is not None and kd_teacher.content_hash == base.content_hash
                   else load_checkpoint(kd_teacher))
        hist = fit(model, dataset, finetune_config(train, opts), teacher=teacher,
                   kd=KDConfig.model_validate(train.get("kd") or {}),
                   teacher_output=kd_teacher.manifest.get("output", "logits"), seed=seed,
                   desc=f"{base_name} {tag} KD fine-tune", eval_at=eval_at, on_eval=on_eval, start_counts=True,
                   features=features)
        val_acc = hist["best_val_acc"]
    if after is not None:
        applied.update(after())
    ckpt = save_checkpoint(model, role=t.role, arch=arch, input_shape=m["input_shape"], graph=graph, info={
        **info, **applied, "finetune_epochs": opts.finetune_epochs, "finetune_steps": opts.finetune_steps,
        "finetune_lr": opts.lr, "val_accuracy": val_acc, "macs_before": before, "params_before": m["params"],
        "train_config": m.get("train_config"),
    })
    log.info("shrink: %s %s (%s) MACs %d->%d params %d->%d val acc %s", base_name, tag,
             info["recipe_text"], before, ckpt.manifest["macs"], m["params"], ckpt.manifest["params"],
             "n/a" if val_acc is None else f"{val_acc:.4f}")
    return ckpt
