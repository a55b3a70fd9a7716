"""Training: a plain supervised loop and Hinton knowledge distillation, with progress bars.

Read top to bottom: ``kd_loss`` is the whole of KD; ``fit`` is the loop both the teacher and the
student (and the post-pruning fine-tune) use.
"""

from __future__ import annotations

import copy
import logging
import random
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def kd_loss(student_logits, teacher_logits, labels, temperature: float = 4.0, alpha: float = 0.9):
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean"
    )
    return alpha * t * t * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def augment(x: torch.Tensor, max_shift_px: float = 1.0) -> torch.Tensor:
    """Random sub-pixel translation of each image by up to ``max_shift_px`` (border padding)."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = (torch.rand(n) * 2 - 1) * 2 * max_shift_px / w
    theta[:, 1, 2] = (torch.rand(n) * 2 - 1) * 2 * max_shift_px / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate(
        [model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    )


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_logits(model, x).argmax(1) == y).mean())


def fit(
    model: nn.Module,
    dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 5e-4,
    seed: int = 0,
    teacher: Optional[nn.Module] = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    desc: str = "train",
) -> dict:
    """Train ``model`` in place (KD from ``teacher`` when given); keep the weights best on val.

    Returns the history: per-epoch train loss and val accuracy, and the best val accuracy.
    """
    seed_everything(seed)
    x_train, y_train = (torch.from_numpy(a) for a in dataset.split("train"))
    x_val, y_val = dataset.split("val")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = max(1, (len(x_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    if teacher is not None:
        teacher.eval()
    best_acc, best_state, history = -1.0, None, {"loss": [], "val_acc": []}
    bar = tqdm(range(epochs), desc=desc, unit="epoch", mininterval=1.0)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(x_train))
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = augment(x_train[idx]), y_train[idx]
            logits = model(xb)
            if teacher is None:
                loss = F.cross_entropy(logits, yb)
            else:
                with torch.no_grad():
                    t_logits = teacher(xb)
                loss = kd_loss(logits, t_logits, yb, temperature, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        val_acc = accuracy(model, x_val, y_val)
        history["loss"].append(total / len(perm))
        history["val_acc"].append(val_acc)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{total / len(perm):.3f}", val_acc=f"{val_acc:.4f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    history["best_val_acc"] = best_acc
    model.eval()
    return history


def _arch(cfg, dataset) -> dict:
    return {
        "name": cfg.arch, "num_classes": len(dataset.classes),
        "in_channels": dataset.input_shape[0], "width": cfg.width,
    }


def train_teacher(dataset, cfg, seed: int = 0):
    """Train the teacher from scratch on the train split, or load the one the config brings
    (``teacher.checkpoint`` / ``teacher.onnx``); returns its Checkpoint."""
    from edgeopt.models import build_model, load_checkpoint, save_checkpoint
    from edgeopt.pretrained import file_sha256, load_state_dict_teacher, onnx_teacher

    seed_everything(seed)
    arch = _arch(cfg, dataset)
    x_val, y_val = dataset.split("val")
    if cfg.onnx is not None:
        ckpt = onnx_teacher(cfg.onnx, dataset.input_shape, arch["num_classes"])
        log.info("train_teacher: loaded ONNX teacher %s (val acc %.4f)", cfg.onnx,
                 accuracy(load_checkpoint(ckpt), x_val, y_val))
        return ckpt
    if cfg.checkpoint is not None:
        model = load_state_dict_teacher(cfg.checkpoint, arch, dataset.input_shape)
        hist = {"best_val_acc": accuracy(model, x_val, y_val), "source": str(cfg.checkpoint),
                "source_sha256": file_sha256(cfg.checkpoint)}
    else:
        model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], arch["width"])
        hist = fit(model, dataset, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                   weight_decay=cfg.weight_decay, seed=seed, desc=f"teacher {cfg.arch}")
    ckpt = save_checkpoint(model, role="teacher", arch=arch, input_shape=dataset.input_shape, info={
        "val_accuracy": hist["best_val_acc"], "history": hist, "data_hash": dataset.data_hash, "tag": "teacher",
        "train_config": cfg.model_dump(mode="json"),
    })
    log.info("train_teacher: %s params %d MACs %d val acc %.4f", cfg.arch, ckpt.manifest["params"],
             ckpt.manifest["macs"], hist["best_val_acc"])
    return ckpt


def distill_student(dataset, teacher_ckpt, cfg, seed: int = 0):
    """Train the student with Hinton KD from the teacher; returns its Checkpoint."""
    from edgeopt.models import build_model, load_checkpoint, save_checkpoint

    seed_everything(seed)
    teacher = load_checkpoint(teacher_ckpt)
    arch = _arch(cfg, dataset)
    model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], arch["width"])
    hist = fit(model, dataset, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
               weight_decay=cfg.weight_decay, seed=seed, teacher=teacher,
               temperature=cfg.kd.temperature, alpha=cfg.kd.alpha, desc=f"student {cfg.arch} (KD)")
    teacher_id = teacher_ckpt.content_hash[:12]
    ckpt = save_checkpoint(model, role="student", arch=arch, input_shape=dataset.input_shape, info={
        "val_accuracy": hist["best_val_acc"], "history": hist, "tag": "p0",
        "lineage": {"teacher": teacher_id}, "train_config": cfg.model_dump(mode="json"),
    })
    log.info("distill_student: %s params %d MACs %d val acc %.4f (teacher %s)", cfg.arch,
             ckpt.manifest["params"], ckpt.manifest["macs"], hist["best_val_acc"], teacher_id)
    return ckpt
