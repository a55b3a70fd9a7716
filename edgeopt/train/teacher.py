"""The teacher: the model to compress. Trained here from scratch, or brought by the user as a state
dict for a known architecture or as an ONNX file (``edgeopt.models.brought``). Either way it ends as a
Checkpoint that is the reference of every comparison, the KD teacher, and a base for variants."""

from __future__ import annotations

import logging

from edgeopt.artifacts import Checkpoint, Dataset
from edgeopt.config import TeacherConfig
from edgeopt.models.brought import file_sha256, load_state_dict_teacher, onnx_teacher
from edgeopt.models.zoo import build_model, load_checkpoint, save_checkpoint
from edgeopt.train.fit import fit, seed_everything, split_accuracy

log = logging.getLogger(__name__)


def train_teacher(dataset: Dataset, cfg: TeacherConfig, seed: int = 0) -> Checkpoint:
    """Train the teacher from scratch on the train split, or load the one the config brings
    (``teacher.checkpoint`` / ``teacher.onnx``); returns its Checkpoint."""
    seed_everything(seed)
    if cfg.onnx is not None:
        ckpt = onnx_teacher(cfg.onnx, dataset)
        acc = split_accuracy(load_checkpoint(ckpt), dataset, "val")
        log.info("train_teacher: brought ONNX model %s, val acc %.4f", cfg.onnx, acc)
        # train_config: how a structural recipe's KD fine-tune trains its torch conversion (batch size, optimizer ...)
        return Checkpoint.write(ckpt.path, {**_info(ckpt), "val_accuracy": acc, "data_hash": dataset.data_hash,
                                            "train_config": cfg.model_dump(mode="json")})
    arch: dict = {"name": cfg.arch, "num_classes": len(dataset.classes), "in_channels": dataset.input_shape[0],
            "width": cfg.width}
    if cfg.checkpoint is not None:
        model = load_state_dict_teacher(cfg.checkpoint, arch, dataset.input_shape)
        hist = {"best_val_acc": split_accuracy(model, dataset, "val"), "source": str(cfg.checkpoint),
                "source_sha256": file_sha256(cfg.checkpoint)}
    else:
        model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], arch["width"])
        hist = fit(model, dataset, cfg, seed=seed, desc=f"teacher {cfg.arch}")
    ckpt = save_checkpoint(model, role="teacher", arch=arch, input_shape=dataset.input_shape, info={
        "base": "teacher", "val_accuracy": hist["best_val_acc"], "history": hist, "data_hash": dataset.data_hash,
        "train_config": cfg.model_dump(mode="json"),
    })
    log.info("train_teacher: %s%s params %d MACs %d val acc %.4f", cfg.arch,
             f" from {cfg.checkpoint}" if cfg.checkpoint else "", ckpt.manifest["params"], ckpt.manifest["macs"],
             hist["best_val_acc"])
    return ckpt


def _info(ckpt: Checkpoint) -> dict:
    return {k: v for k, v in ckpt.manifest.items() if k not in ("kind", "files")}
