"""Structured channel pruning with torch-pruning (DepGraph): the pruned model is physically smaller.

Coupled channels (residual adds, depthwise convs) are removed together, so the result is a plain
``nn.Module`` with fewer channels that exports to ONNX like any other. The classifier's outputs are
never pruned.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from edgeopt.models import count_macs_params

log = logging.getLogger(__name__)


def prune_channels(model: nn.Module, input_shape, num_classes: int, ratio: float, importance: str = "l2") -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer group, in place; returns the model."""
    if not 0 <= ratio < 1:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return model
    import torch_pruning as tp

    model.eval()
    example = torch.zeros(1, *input_shape)
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    ignored += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    p = {"l1": 1, "l2": 2}[importance]
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=p), pruning_ratio=ratio,
        ignored_layers=ignored,
    )
    before = count_macs_params(model, input_shape)
    pruner.step()
    after = count_macs_params(model, input_shape)
    log.info(
        "prune: ratio=%.2f MACs %s->%s params %s->%s",
        ratio, _si(before[0]), _si(after[0]), _si(before[1]), _si(after[1]),
    )
    return model


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def prune_student(student_ckpt, teacher_ckpt, dataset, ratio: float, cfg, seed: int = 0):
    """Structured pruning of the student by ``ratio``, then a KD fine-tune from the teacher.

    Returns a Checkpoint recording MACs and params before and after. Ratio 0 returns the student.
    """
    from edgeopt.models import load_checkpoint, save_checkpoint
    from edgeopt.training import fit

    if ratio == 0:
        return student_ckpt
    model = load_checkpoint(student_ckpt)
    shape = student_ckpt.manifest["input_shape"]
    prune_channels(model, shape, student_ckpt.manifest["arch"]["num_classes"], ratio, cfg.importance)
    hist = {"best_val_acc": None}
    if cfg.finetune_epochs:
        teacher = load_checkpoint(teacher_ckpt)
        kd = student_ckpt.manifest["train_config"]["kd"]
        hist = fit(model, dataset, epochs=cfg.finetune_epochs, batch_size=64, lr=cfg.lr, seed=seed,
                   teacher=teacher, temperature=kd["temperature"], alpha=kd["alpha"],
                   desc=f"prune {ratio:.2f} KD fine-tune")
    lineage = {**student_ckpt.manifest["lineage"], "student": student_ckpt.content_hash[:12]}
    return save_checkpoint(model, role="pruned", arch=student_ckpt.manifest["arch"], input_shape=shape, info={
        "prune_ratio": ratio, "importance": cfg.importance, "finetune_epochs": cfg.finetune_epochs,
        "val_accuracy": hist["best_val_acc"], "macs_before": student_ckpt.manifest["macs"],
        "params_before": student_ckpt.manifest["params"], "lineage": lineage,
        "train_config": student_ckpt.manifest["train_config"],
    })
