"""Shrink a base model with one structural technique, then recover its accuracy by KD.

The same sequence for every technique (``edgeopt.techniques``): load the base, ``apply`` the
technique, fine-tune with knowledge distillation from the KD teacher (for a distilled student, the
teacher; for the teacher or a brought model, the original model itself), run the technique's
after-fine-tune hook, save. Usable from a notebook::

    shrunk = shrink_base(student, teacher, dataset, "prune", 0.5, PruneOptions(amounts=[0.5]))
"""

from __future__ import annotations

import logging
from typing import Any, Dict

from edgeopt.artifacts import Checkpoint, Dataset, new_workdir
from edgeopt.config import FitConfig, KDConfig
from edgeopt.models import load_checkpoint, save_checkpoint
from edgeopt.techniques import ShrinkContext, TechniqueOptions, get
from edgeopt.training import fit, seed_everything

log = logging.getLogger(__name__)

def finetune_config(train_config: dict, opts: TechniqueOptions) -> FitConfig:
    """The base's own training settings (batch size, optimizer, augmentation ...; defaults for a
    brought model), run for the technique's fine-tune epochs at its learning rate."""
    own = {k: v for k, v in train_config.items() if k in FitConfig.model_fields}
    return FitConfig.model_validate({**own, "epochs": opts.finetune_epochs, "steps": None, "lr": opts.lr})


def shrink_base(base: Checkpoint, kd_teacher: Checkpoint, dataset: Dataset, technique: str, amount: float,
                opts: TechniqueOptions, seed: int = 0) -> Checkpoint:
    """``technique`` at ``amount`` on ``base``, KD fine-tuned from ``kd_teacher``; the Checkpoint records
    MACs and params before and after, the recipe and the lineage. A base that did not learn is not
    shrunk: the result says so and its variants are skipped."""
    t = get(technique)
    m = base.manifest
    tag, base_name, train = t.variant_tag(amount), m.get("base", m["role"]), m.get("train_config") or {}
    lineage = {**m.get("lineage", {}), m["role"]: base.content_hash[:12]}
    info: Dict[str, Any] = {"tag": tag, "base": base_name, "lineage": lineage,
                            "shrink": {"technique": technique, "amount": amount},
                            "recipe_text": t.recipe(amount, opts)}
    if not m.get("learned", True):
        return Checkpoint.write(new_workdir(t.role), {
            "role": t.role, **info, "learned": False, "reason": f"the base {m['role']} did not learn"})
    seed_everything(seed)
    model = load_checkpoint(base)
    ctx = ShrinkContext(dataset=dataset, input_shape=m["input_shape"], num_classes=m["arch"]["num_classes"],
                        seed=seed, load_base=lambda: load_checkpoint(base))
    applied, after = t.apply(model, amount, opts, ctx)
    val_acc = None
    if opts.finetune_epochs:
        hist = fit(model, dataset, finetune_config(train, opts), teacher=load_checkpoint(kd_teacher),
                   kd=KDConfig.model_validate(train.get("kd") or {}),
                   teacher_output=kd_teacher.manifest.get("output", "logits"), seed=seed,
                   desc=f"{base_name} {tag} KD fine-tune")
        val_acc = hist["best_val_acc"]
    if after is not None:
        applied.update(after())
    ckpt = save_checkpoint(model, role=t.role, arch=m["arch"], input_shape=m["input_shape"], info={
        **info, **applied, "finetune_epochs": opts.finetune_epochs, "finetune_lr": opts.lr, "val_accuracy": val_acc,
        "macs_before": m["macs"], "params_before": m["params"], "train_config": m.get("train_config"),
    })
    log.info("shrink: %s %s (%s) MACs %d->%d params %d->%d val acc %s", base_name, tag,
             info["recipe_text"], m["macs"], ckpt.manifest["macs"], m["params"], ckpt.manifest["params"],
             "n/a" if val_acc is None else f"{val_acc:.4f}")
    return ckpt
