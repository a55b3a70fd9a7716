"""Training: one loop for the teacher, the student and every KD fine-tune after a shrink.

Read top to bottom:

- ``kd_loss`` is the whole of knowledge distillation (Hinton et al. 2015); ``FeatureKD`` adds the
  matching of intermediate features (FitNets, Romero et al. 2015) after a shrink that kept their shape;
- ``resolve_augment`` and ``Augmenter``: what each training image goes through, chosen from the data
  when the config says ``auto``;
- ``recalibrate_bn``: BatchNorm statistics recomputed from the final weights. torchvision's
  MobileNetV3 and EfficientNet build BatchNorm with momentum 0.01, so after a few hundred steps their
  running statistics still describe the initial weights and the model evaluates at chance while its
  loss falls;
- ``fit``: the loop. Optimizer steps with a linear warm-up and a cosine decay; a KD teacher that sees
  the student's own augmented views (function matching, Beyer et al. 2022); evaluation on the val
  split with early stop (or a caller's stop, e.g. a search's successive halving); the best weights
  kept; a model that ends near chance marked as not learned;
- ``distill_student``: build the student (optionally from a local pretrained state dict), distill it,
  write its Checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
import time
from typing import Callable, Collection, Dict, Iterable, Iterator, Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from edgeopt.artifacts import Checkpoint, Dataset, sha256_file
from edgeopt.config import AugmentConfig, FitConfig, KDConfig, StudentConfig, resolve_path
from edgeopt.models.brought import PretrainedError, _read_state_dict
from edgeopt.models.zoo import build_model, load_checkpoint, save_checkpoint
from edgeopt.train.features import FeatureKD, capture, feature_loss

log = logging.getLogger(__name__)

# "auto" augmentation: below this many pixels a side an image only bears a sub-pixel shift
TINY_SIDE = 32
# A pretrained state dict must fill at least this fraction of the model's tensors to be worth loading
MIN_PRETRAINED_MATCH = 0.5


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def kd_loss(student_logits, teacher_logits, labels, temperature: float = 4.0, alpha: float = 0.9,
            label_smoothing: float = 0.0):
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean"
    )
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * t * t * soft + (1 - alpha) * hard


def resolve_augment(augment: Literal["auto"] | AugmentConfig, dataset: Dataset) -> AugmentConfig:
    """The augmentation to train with: the configured options, or for ``auto`` what suits the data.

    Digits and images under 32 pixels a side bear only a 1-pixel shift: a crop or a mirror of an 8x8
    digit changes what it is. Larger grayscale images (scans, text) get crops but no mirror. RGB
    photos get crops and mirrors. The crop keeps at least half the area, milder than ImageNet's 8 %,
    and colour jitter stays off, because small data comes with short schedules: a mobilenet_v3_small
    trained 150 steps on 64x64 photo crops of 3 classes scored 98.9 % on held-out crops with flips,
    95.6 % with flips and crops of at least half the area, 85.6 % with jitter 0.1 added, 81.1 % with
    crops of 35 % and jitter 0.3, and 87.8 % with no augmentation.
    """
    if augment != "auto":
        return augment
    channels, height, width = dataset.input_shape
    if dataset.manifest["source"] == "digits" or min(height, width) < TINY_SIDE:
        return AugmentConfig(shift_px=1.0)
    if channels == 1:
        return AugmentConfig(random_resized_crop=0.5)
    return AugmentConfig(random_resized_crop=0.5, hflip=True)


def random_shift(x: torch.Tensor, max_shift_px: float) -> torch.Tensor:
    """Random sub-pixel translation of each image by up to ``max_shift_px`` (border padding)."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = (torch.rand(n) * 2 - 1) * 2 * max_shift_px / w
    theta[:, 1, 2] = (torch.rand(n) * 2 - 1) * 2 * max_shift_px / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


class Augmenter:
    """uint8 images (N x C x H x W) -> augmented model input (normalized float32), one draw per image.

    The crop, flip and jitter run on the stored uint8 pixels (torchvision transforms v2 draw their
    parameters once per call, so each image gets its own call); the shift runs on the normalized
    batch, where border padding repeats real pixels.
    """

    def __init__(self, cfg: AugmentConfig, dataset: Dataset):
        per_image = []
        if cfg.random_resized_crop is not None:
            per_image.append(v2.RandomResizedCrop(dataset.input_shape[1:], scale=(cfg.random_resized_crop, 1.0),
                                                  antialias=True))
        if cfg.hflip:
            per_image.append(v2.RandomHorizontalFlip())
        if cfg.color_jitter:
            j = cfg.color_jitter
            per_image.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
        self.per_image = v2.Compose(per_image) if per_image else None
        self.shift_px = cfg.shift_px
        self.normalize = dataset.normalize

    def __call__(self, raw: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(raw))
        if self.per_image is not None:
            x = torch.stack([self.per_image(image) for image in x])
        x = torch.from_numpy(self.normalize(x.numpy()))
        return random_shift(x, self.shift_px) if self.shift_px else x


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` where there is none is a ValueError."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for, but torch sees no CUDA device (use auto or cpu)")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _on(module: nn.Module, device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` as a function of tensors on ``device``: moved there (in ``memory_format``) when it has
    weights; a module that has none (a brought ONNX teacher run by ONNX Runtime) is fed contiguous tensors
    on the CPU and its outputs moved."""
    if any(True for _ in module.parameters()):
        module.to(device).to(memory_format=memory_format)
        return module
    return lambda x: module(x.cpu().contiguous()).to(device)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> int:
    """Recompute every BatchNorm's running mean and variance as the plain average over ``batches``
    (model input, un-augmented: what the model will see), then leave ``model`` in eval mode.

    Each layer's momentum is set to None (cumulative average) for the pass and restored after, so
    that training may go on. Returns the number of batches seen (0 for a model without BatchNorm).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        model.eval()
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen, device = 0, _device_of(model)
    for x, _ in batches:
        model(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        seen += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return seen


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate(
        [model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    )


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_logits(model, x).argmax(1) == y).mean())


@torch.inference_mode()
def split_accuracy(model: nn.Module, dataset: Dataset, split: str, batch_size: int = 64) -> float:
    """Eval-mode accuracy on a split of ``dataset``, streamed a batch at a time."""
    model.eval()
    device = _device_of(model)
    hits = sum(int((model(torch.from_numpy(x).to(device)).argmax(1).cpu().numpy() == y).sum())
               for x, y in dataset.batches(split, batch_size))
    return hits / dataset.size(split)


def chance_level(labels: np.ndarray) -> Tuple[float, float]:
    """(chance, the least accuracy that shows learning) on a split with these labels.

    Chance is the majority class's share (what always answering that class scores). A model has
    learned when it beats chance by max(10 points, 3 binomial standard errors of chance on this
    many images); the margin stops halfway from chance to 100 %, so that data where one class
    dominates can still be learned.
    """
    n = len(labels)
    chance = float(np.bincount(labels).max()) / n
    margin = max(0.10, 3 * math.sqrt(chance * (1 - chance) / n))
    return chance, chance + min(margin, (1 - chance) / 2)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Step ``k`` (from 0) runs at lr x (k+1)/warmup_steps during the warm-up, then on a cosine from
    lr down to 0 at ``steps``."""
    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (k - warmup_steps) / max(1, steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)


def train_batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Endless uint8 train batches, reshuffled every epoch. A last batch of one image is left out:
    BatchNorm cannot take statistics of a single value."""
    for epoch in itertools.count():
        for x, y in dataset.batches("train", batch_size, shuffle=True, seed=seed + epoch, normalized=False):
            if len(y) > 1:
                yield x, y


def fit(model: nn.Module, dataset: Dataset, cfg: FitConfig, *, teacher: Optional[nn.Module] = None,
        kd: KDConfig = KDConfig(), teacher_output: Literal["logits", "probabilities"] = "logits", seed: int = 0,
        desc: str = "train", eval_at: Collection[int] = (),
        on_eval: Optional[Callable[[int, float], bool]] = None, start_counts: bool = False,
        features: Optional[FeatureKD] = None) -> Dict:
    """Train ``model`` in place (by KD from ``teacher`` when given) and leave it in eval mode with the
    weights best on the val split (their BatchNorm statistics recalibrated unless
    ``cfg.bn_recalibration_batches`` is 0).

    ``cfg`` is the recipe (a TrainConfig, e.g. the student's, is one). The teacher may be any module,
    an ONNX model run by ONNX Runtime included; it sees the student's own augmented views. A teacher
    that outputs probabilities (``teacher_output``) gets their log taken: log-probabilities are
    logits up to a constant, which the temperature softmax ignores.

    Training runs on ``cfg.device`` (``auto``: CUDA when there is one); the model is back on the CPU when
    this returns.

    The val split is evaluated every ``cfg.eval_every`` steps (default: each epoch), at the steps in
    ``eval_at`` and at the last step. ``on_eval(step, val_acc)``, when given, is called after each
    evaluation; True stops the run there, on the schedule it had (a cosine sized for ``cfg.steps``, not
    shortened): a search's successive halving runs one fine-tune to its longest rung and stops it at an
    earlier one, so that a rung continues the last one instead of starting over.

    ``features``: intermediate-feature distillation added to the loss (:class:`FeatureKD`).

    ``start_counts``: the weights as given are evaluated first (step 0; ``on_eval`` sees it, and cannot
    stop there) and kept if no step beats them (a fine-tune of a model that is already good, e.g. pruned
    and refit, must not leave it worse).

    Returns the history: per evaluation the step, the mean train loss since the last one and the val
    accuracy (the curve); with ``start_counts`` the start's val accuracy; the best val accuracy and its
    step (0: the start); whether early stop ended the run;
    what stopped it (``stopped_by``: None, ``patience`` or ``on_eval``); the chance level and whether the
    model learned (``chance_level``); the augmentation used; the device.
    """
    seed_everything(seed)
    device = resolve_device(cfg.device)
    model.to(device)
    # channels-last on a CPU: oneDNN's convolution kernels train a depthwise net (EfficientNet-Lite at
    # 224x224) about 2.5x faster than in NCHW, and run its KD teacher 1.7x faster; both go back to the
    # default layout at the end
    memory_format = (torch.channels_last if device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
                     else torch.contiguous_format)
    model.to(memory_format=memory_format)
    augment = resolve_augment(cfg.augment, dataset)
    augmenter = Augmenter(augment, dataset)
    steps_per_epoch = math.ceil(dataset.size("train") / cfg.batch_size)
    steps = cfg.steps or cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    optimizer = make_optimizer(model, cfg)
    scheduler = warmup_cosine(optimizer, steps, round(cfg.warmup * steps))
    chance, learned_above = chance_level(dataset.labels("val"))
    if teacher is not None:
        teacher.eval()
        teach = _on(teacher, device, memory_format)
    student_feats: Dict[str, torch.Tensor] = {}
    teacher_feats: Dict[str, torch.Tensor] = {}
    hooks = []
    if features is not None:
        features.teacher.eval()
        feature_teacher = _on(features.teacher, device, memory_format)
        hooks = (capture(model, features.layers, student_feats)
                 + capture(features.teacher, features.layers, teacher_feats))
    log.info("%s: %d steps of %d images (%.1f epochs) on %s, %s lr %g, augment %s", desc, steps, cfg.batch_size,
             steps / steps_per_epoch, device.type, cfg.optimizer, cfg.lr,
             augment.model_dump(exclude_defaults=True) or "none")

    history: Dict = {"step": [], "loss": [], "val_acc": []}
    best_acc, best_step, evals_since_best, stopped_by = -1.0, 0, 0, None
    best_state: Dict[str, torch.Tensor] = {}  # set at the first evaluation: the last step always evaluates
    loss_sum, loss_n = 0.0, 0
    start = time.perf_counter()
    if start_counts:
        best_acc = history["start_val_acc"] = split_accuracy(model, dataset, "val", cfg.batch_size)
        best_state = copy.deepcopy(model.state_dict())
        if on_eval is not None:  # the start is an evaluation too (step 0), never a stop
            on_eval(0, best_acc)
    model.train()
    bar = tqdm(total=steps, desc=desc, unit="step", mininterval=1.0)
    for step, (raw, labels) in enumerate(train_batches(dataset, cfg.batch_size, seed), start=1):
        x, y = augmenter(raw).to(device), torch.from_numpy(labels).to(device)
        x = x.contiguous(memory_format=memory_format)
        logits = model(x)
        if teacher is None:
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        else:
            with torch.no_grad():
                t_out = teach(x)
            t_logits = t_out.clamp_min(1e-12).log() if teacher_output == "probabilities" else t_out
            loss = kd_loss(logits, t_logits, y, kd.temperature, kd.alpha, cfg.label_smoothing)
        if features is not None:
            if features.teacher is not teacher:
                with torch.no_grad():
                    feature_teacher(x)
            loss = loss + features.weight * feature_loss(student_feats, teacher_feats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum, loss_n = loss_sum + float(loss.detach()) * len(y), loss_n + len(y)
        bar.update()

        if step % eval_every == 0 or step == steps or step in eval_at:
            if cfg.bn_recalibration_batches:
                recalibrate_bn(model, dataset.batches("train", cfg.batch_size, shuffle=True, seed=seed,
                                                      limit=cfg.bn_recalibration_batches * cfg.batch_size))
            val_acc = split_accuracy(model, dataset, "val", cfg.batch_size)
            history["step"].append(step)
            history["loss"].append(loss_sum / loss_n)
            history["val_acc"].append(val_acc)
            bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", val_acc=f"{val_acc:.4f}")
            loss_sum, loss_n = 0.0, 0
            # a tie goes to the later weights (further down the cosine); only a gain resets the patience
            evals_since_best = 0 if val_acc > best_acc else evals_since_best + 1
            if val_acc >= best_acc:
                best_acc, best_step, best_state = val_acc, step, copy.deepcopy(model.state_dict())
            if cfg.patience is not None and evals_since_best >= cfg.patience and step < steps:
                stopped_by = "patience"
            if on_eval is not None and on_eval(step, val_acc) and step < steps:
                stopped_by = "on_eval"
            if step == steps or stopped_by:
                break
            model.train()
    bar.close()
    for h in hooks:
        h.remove()
    model.load_state_dict(best_state)
    model.cpu().to(memory_format=torch.contiguous_format).eval()
    for t in (teacher, features.teacher if features else None):
        if t is not None:
            t.cpu().to(memory_format=torch.contiguous_format)
    history.update(best_val_acc=best_acc, best_step=best_step, steps=step, stopped_early=step < steps,
                   stopped_by=stopped_by, chance=chance, learned=best_acc >= learned_above,
                   augment=augment.model_dump(), device=device.type)
    log.info("%s: %d steps in %.0f s%s, best val acc %.4f at step %d (chance %.4f)%s", desc, step,
             time.perf_counter() - start, {"patience": f" (early stop: no gain in {cfg.patience} evaluations)",
                                           "on_eval": f" (stopped by its caller, of {steps})"}.get(stopped_by or "", ""),
             best_acc, best_step, chance,
             "" if history["learned"] else ": did not learn")
    return history


def load_matching_weights(model: nn.Module, path) -> Dict:
    """Load into ``model`` every tensor of the state dict at ``path`` (``.pt``/``.pth`` read with
    ``weights_only=True``, or ``.safetensors``) whose name and shape match; the others keep their fresh
    initialization, e.g. a classifier for 1000 ImageNet classes when the data has 3.

    Returns what happened (file, sha256, tensors loaded, the model's tensors left as they were, the
    file's tensors unused). A file that fills less than half of the model is the wrong file: one-line
    PretrainedError naming it.
    """
    path = resolve_path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(matched) < MIN_PRETRAINED_MATCH * len(own):
        example = next((f"{k}: file {list(v.shape)} vs model {list(own[k].shape)}" for k, v in state.items()
                        if k in own and k not in matched), f"e.g. model tensor {next(iter(own))} not in the file")
        raise PretrainedError(f"{path}: only {len(matched)} of the model's {len(own)} tensors match the file by name "
                              f"and shape ({example}): is it a state dict for this architecture?")
    model.load_state_dict(matched, strict=False)
    return {"file": str(path), "sha256": sha256_file(path), "loaded": len(matched),
            "kept_initial": sorted(set(own) - set(matched)), "unused": sorted(set(state) - set(matched))}


def _arch(cfg, dataset) -> dict:
    return {
        "name": cfg.arch, "num_classes": len(dataset.classes),
        "in_channels": dataset.input_shape[0], "width": cfg.width,
    }


def distill_student(dataset: Dataset, teacher_ckpt: Checkpoint, cfg: StudentConfig, seed: int = 0) -> Checkpoint:
    """Distill the student from the teacher (function matching: both see the same augmented views),
    starting from ``cfg.checkpoint``'s weights when given; returns its Checkpoint.

    The manifest says whether the student learned (``learned``, with ``history`` holding its val
    curve): a student that ends near chance is kept and reported, never raised, and the pipeline
    skips its variants.
    """
    seed_everything(seed)
    teacher = load_checkpoint(teacher_ckpt)
    arch = _arch(cfg, dataset)
    model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], arch["width"])
    info: Dict = {}
    if cfg.checkpoint is not None:
        info["pretrained"] = load_matching_weights(model, cfg.checkpoint)
        log.info("distill_student: %s from %s: %d tensors loaded, %d kept initial (%s), %d unused", cfg.arch,
                 cfg.checkpoint, info["pretrained"]["loaded"], len(info["pretrained"]["kept_initial"]),
                 ", ".join(info["pretrained"]["kept_initial"][:4]), len(info["pretrained"]["unused"]))
    hist = fit(model, dataset, cfg, teacher=teacher, kd=cfg.kd, teacher_output=teacher_ckpt.manifest.get("output", "logits"),
               seed=seed, desc=f"student {cfg.arch} (KD)")
    teacher_id = teacher_ckpt.content_hash[:12]
    ckpt = save_checkpoint(model, role="student", arch=arch, input_shape=dataset.input_shape, info={
        **info, "val_accuracy": hist["best_val_acc"], "learned": hist["learned"], "history": hist, "tag": "p0",
        "lineage": {"teacher": teacher_id}, "train_config": cfg.model_dump(mode="json"),
    })
    if hist["learned"]:
        log.info("distill_student: %s params %d MACs %d val acc %.4f (teacher %s)", cfg.arch,
                 ckpt.manifest["params"], ckpt.manifest["macs"], hist["best_val_acc"], teacher_id)
    else:
        log.warning("distill_student: %s did not learn (val acc %.1f %%, chance %.1f %%)", cfg.arch,
                    100 * hist["best_val_acc"], 100 * hist["chance"])
    return ckpt
