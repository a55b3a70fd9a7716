"""Shrinking the student: structured channel pruning, low-rank factorization, unstructured sparsity.

Each technique changes the model, then a KD fine-tune from the teacher recovers the accuracy:

- ``prune``: torch-pruning (DepGraph) removes whole channels, so the model is physically smaller.
  Coupled channels (residual adds, depthwise convs) are removed together; the classifier's outputs
  are never pruned.
- ``lowrank``: truncated-SVD factorization of Linear and Conv layers (:mod:`edgeopt.lowrank`).
- ``sparsity``: magnitude pruning of single weights; the zeros stay in dense tensors, so the model
  is smaller only once compressed, which the checkpoint's sparsity report measures.

Usable from a notebook::

    shrunk = shrink_student(student, teacher, dataset, "lowrank", 0.9, LowRankConfig())
"""

from __future__ import annotations

import logging
import zlib
from typing import Dict, List, Optional, Sequence, Tuple, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from edgeopt.artifacts import Checkpoint, Dataset
from edgeopt.config import FinetuneConfig, LowRankConfig, PruneConfig, SparsityConfig
from edgeopt.lowrank import factorize_lowrank
from edgeopt.models import count_macs_params, load_checkpoint, save_checkpoint
from edgeopt.training import fit, seed_everything

log = logging.getLogger(__name__)

SHRINK_METHODS = ("prune", "lowrank", "sparsity")
IMPORTANCES = get_args(PruneConfig.model_fields["importance"].annotation)  # l1, l2, taylor, bn_scale, fpgm, random
TAYLOR_BATCHES, TAYLOR_BATCH_SIZE = 4, 64  # train batches whose gradients score channels for ``taylor``


def output_layers(model: nn.Module, num_classes: int) -> List[nn.Module]:
    """The classifier layers (Linear or Conv2d with ``num_classes`` outputs): never shrunk."""
    return [
        m for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)
    ]


def _importance(name: str):
    import torch_pruning as tp

    imp = tp.importance
    builders = {
        "l1": lambda: imp.MagnitudeImportance(p=1), "l2": lambda: imp.MagnitudeImportance(p=2),
        "taylor": imp.TaylorImportance, "bn_scale": imp.BNScaleImportance, "fpgm": imp.FPGMImportance,
        "random": imp.RandomImportance,
    }
    if name not in builders:
        raise ValueError(f"unknown channel importance {name!r}; expected one of {', '.join(IMPORTANCES)}")
    return builders[name]()


def _accumulate_gradients(model: nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fresh gradients of the cross-entropy over ``batches`` (what Taylor importance scores), in eval
    mode so that BatchNorm statistics stay as they are."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()


def prune_channels(model: nn.Module, input_shape, num_classes: int, ratio: float, importance: str = "l2", *,
                   global_pruning: bool = False, iterative_steps: int = 1,
                   gradient_batches: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer group, in place; returns the model.

    ``importance`` is one of l1, l2, taylor, bn_scale, fpgm, random; ``taylor`` needs
    ``gradient_batches`` ((images, labels) tensors), scored again before each of the
    ``iterative_steps`` steps. ``global_pruning`` ranks channels across all layers.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    if iterative_steps < 1:
        raise ValueError(f"iterative_steps must be at least 1, got {iterative_steps}")
    imp = _importance(importance)
    if importance == "taylor" and not gradient_batches:
        raise ValueError("taylor importance needs gradient_batches: (images, labels) to score channels with")
    if ratio == 0:
        return model
    import torch_pruning as tp

    model.eval()  # tracing the graph must not update BatchNorm statistics
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(1, *input_shape), importance=imp, pruning_ratio=ratio, global_pruning=global_pruning,
        iterative_steps=iterative_steps, ignored_layers=output_layers(model, num_classes),
    )
    before = count_macs_params(model, input_shape)
    for _ in range(iterative_steps):
        if importance == "taylor":
            _accumulate_gradients(model, gradient_batches)
        pruner.step()
    model.zero_grad(set_to_none=True)
    after = count_macs_params(model, input_shape)
    log.info(
        "prune: ratio=%.2f importance=%s global=%s steps=%d MACs %s->%s params %s->%s", ratio, importance,
        global_pruning, iterative_steps, _si(before[0]), _si(after[0]), _si(before[1]), _si(after[1]),
    )
    return model


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _sparsifiable(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def sparsify(model: nn.Module, amount: float, global_pruning: bool = True) -> List[Tuple[nn.Module, str]]:
    """Zero ``amount`` of the Conv2d/Linear weights by magnitude (one global threshold, or per layer).

    The zeros are a pruning mask (``torch.nn.utils.prune``) that stays applied while the model
    trains; :func:`bake_sparsity` makes them plain zeros in the weights. Returns the masked params.
    """
    if not 0 < amount < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {amount}")
    params = [(m, "weight") for _, m in _sparsifiable(model)]
    if global_pruning:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for m, name in params:
            prune.l1_unstructured(m, name, amount=amount)
    return params


def bake_sparsity(params: List[Tuple[nn.Module, str]]) -> None:
    """Remove the pruning reparametrization: the masked weights become plain zeros."""
    for m, name in params:
        prune.remove(m, name)


def _weights_blob(model: nn.Module) -> bytes:
    return b"".join(m.weight.detach().numpy().tobytes() for _, m in _sparsifiable(model))


def sparsity_report(sparse: nn.Module, dense: nn.Module) -> Dict:
    """Measured sparsity of each Conv2d/Linear weight and overall, and what zlib makes of the
    weight bytes of ``dense`` and ``sparse`` (the saving sparsity buys once compressed)."""
    layers = {n: float((m.weight == 0).float().mean()) for n, m in _sparsifiable(sparse)}
    zeros = sum(int((m.weight == 0).sum()) for _, m in _sparsifiable(sparse))
    total = sum(m.weight.numel() for _, m in _sparsifiable(sparse))
    blob = _weights_blob(sparse)
    dense_z, sparse_z = len(zlib.compress(_weights_blob(dense))), len(zlib.compress(blob))
    return {
        "layers": layers, "overall": zeros / total, "weight_bytes": len(blob),
        "zlib_bytes_dense": dense_z, "zlib_bytes_sparse": sparse_z, "zlib_saving": 1 - sparse_z / dense_z,
    }


def _taylor_batches(dataset: Dataset, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    x, y = dataset.split("train")
    idx = np.random.default_rng(seed).permutation(len(x))[: TAYLOR_BATCHES * TAYLOR_BATCH_SIZE]
    return [
        (torch.from_numpy(x[idx[i : i + TAYLOR_BATCH_SIZE]]), torch.from_numpy(y[idx[i : i + TAYLOR_BATCH_SIZE]]))
        for i in range(0, len(idx), TAYLOR_BATCH_SIZE)
    ]


def _kd_finetune(model: nn.Module, student_ckpt: Checkpoint, teacher_ckpt: Checkpoint, dataset: Dataset,
                 cfg: FinetuneConfig, seed: int, desc: str) -> Optional[float]:
    """KD fine-tune with the student's own temperature and alpha; returns the best val accuracy."""
    if not cfg.finetune_epochs:
        return None
    train = student_ckpt.manifest["train_config"]
    hist = fit(model, dataset, epochs=cfg.finetune_epochs, batch_size=train["batch_size"], lr=cfg.lr, seed=seed,
               teacher=load_checkpoint(teacher_ckpt), temperature=train["kd"]["temperature"],
               alpha=train["kd"]["alpha"], desc=f"{desc} KD fine-tune")
    return hist["best_val_acc"]


def shrink_student(student_ckpt: Checkpoint, teacher_ckpt: Checkpoint, dataset: Dataset, method: str,
                   amount: float, cfg: PruneConfig | LowRankConfig | SparsityConfig, seed: int = 0) -> Checkpoint:
    """Shrink the student with ``method``, then KD fine-tune it from the teacher.

    - ``prune``: remove ``amount`` of the channels (``cfg``: PruneConfig); tag ``p50``; amount 0
      (or method ``none``) returns the student itself.
    - ``lowrank``: factorize layers keeping ``amount`` of their singular-value energy
      (``cfg``: LowRankConfig); tag ``lr90``; the plan ``{layer: rank}`` is in the manifest.
    - ``sparsity``: zero ``amount`` of the weights by magnitude (``cfg``: SparsityConfig); tag
      ``sp50``; the manifest holds the measured sparsity and the compressed-size saving.

    The Checkpoint records MACs and params before and after, the options and the lineage.
    """
    if method == "none" or (method == "prune" and amount == 0):
        return student_ckpt
    if method not in SHRINK_METHODS:
        raise ValueError(f"unknown shrink method {method!r}; expected one of none, {', '.join(SHRINK_METHODS)}")
    seed_everything(seed)
    model = load_checkpoint(student_ckpt)
    manifest = student_ckpt.manifest
    shape, num_classes = manifest["input_shape"], manifest["arch"]["num_classes"]
    tag = {"prune": "p", "lowrank": "lr", "sparsity": "sp"}[method] + str(round(amount * 100))
    if method == "prune":
        prune_channels(model, shape, num_classes, amount, cfg.importance, global_pruning=cfg.global_pruning,
                       iterative_steps=cfg.iterative_steps,
                       gradient_batches=_taylor_batches(dataset, seed) if cfg.importance == "taylor" else None)
        role, info = "pruned", {"prune_ratio": amount, "importance": cfg.importance,
                                "global_pruning": cfg.global_pruning, "iterative_steps": cfg.iterative_steps}
    elif method == "lowrank":
        plan = factorize_lowrank(model, amount, cfg.min_params_saved, exclude=output_layers(model, num_classes))
        role, info = "lowrank", {"lowrank_plan": plan, "energy": amount, "min_params_saved": cfg.min_params_saved}
    else:
        masked = sparsify(model, amount, cfg.global_pruning)
    val_acc = _kd_finetune(model, student_ckpt, teacher_ckpt, dataset, cfg, seed, f"{method} {amount:.2f}")
    if method == "sparsity":
        bake_sparsity(masked)  # after the fine-tune, which trained through the mask: the zeros stay zeros
        role, info = "sparse", {"sparsity": sparsity_report(model, load_checkpoint(student_ckpt)),
                                "global_pruning": cfg.global_pruning}
    lineage = {**manifest["lineage"], "student": student_ckpt.content_hash[:12]}
    return save_checkpoint(model, role=role, arch=manifest["arch"], input_shape=shape, info={
        "tag": tag, "shrink": {"method": method, "amount": amount}, **info,
        "finetune_epochs": cfg.finetune_epochs, "finetune_lr": cfg.lr, "val_accuracy": val_acc,
        "macs_before": manifest["macs"], "params_before": manifest["params"], "lineage": lineage,
        "train_config": manifest["train_config"],
    })
