"""Datasets: scikit-learn's bundled digits (the embedded default) and ImageFolder trees.

Both end as one :class:`~edgeopt.artifacts.Dataset`: a seeded, stratified train/val/test split
of float32 NCHW arrays normalized with the train split's per-channel mean and std, plus a hash of
the raw data so a changed dataset is visible (and invalidates the cache) while an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import List, Tuple

import numpy as np
from sklearn.model_selection import train_test_split

from edgeopt.artifacts import Dataset, new_workdir
from edgeopt.config import PROJECT_ROOT, DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """A problem with the user's data, phrased for the user (names the file or folder)."""


def _load_digits() -> Tuple[np.ndarray, np.ndarray, List[str], str]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    h = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    return x, y, [str(c) for c in d.target_names], h


def _load_imagefolder(cfg: DataConfig) -> Tuple[np.ndarray, np.ndarray, List[str], str]:
    from PIL import Image, UnidentifiedImageError

    root = cfg.root if cfg.root.is_absolute() else PROJECT_ROOT / cfg.root
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: an ImageFolder needs at least two class folders, found {len(classes)}")
    files = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((root / c).rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    for i, c in enumerate(classes):
        if not any(label == i for _, label in files):
            raise DataError(f"{root / c}: class folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    mode = "L" if cfg.grayscale else "RGB"
    h = hashlib.sha256()
    images = []
    for p, label in files:
        raw = p.read_bytes()
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + raw)
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if cfg.image_size is not None:
                    im = im.resize((cfg.image_size[1], cfg.image_size[0]), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.float32) / 255.0)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{p}: not a readable image ({err})") from None
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{root}: images differ in size {sorted(shapes)[:3]}...; set data.image_size")
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y = np.array([label for _, label in files], dtype=np.int64)
    if cfg.image_size is not None:
        h.update(repr(tuple(cfg.image_size)).encode())
    h.update(mode.encode())
    return np.ascontiguousarray(x), y, classes, h.hexdigest()


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Load, split (stratified, seeded) and normalize; write the Dataset folder."""
    x, y, classes, data_hash = _load_digits() if cfg.source == "digits" else _load_imagefolder(cfg)
    counts = np.bincount(y, minlength=len(classes))
    if counts.min() < 3:
        raise DataError(f"class {classes[int(counts.argmin())]!r} has {counts.min()} images; need at least 3")
    idx = np.arange(len(y))
    idx_trainval, idx_test = train_test_split(idx, test_size=cfg.split.test, random_state=seed, stratify=y)
    val_frac = cfg.split.val / (1 - cfg.split.test)
    idx_train, idx_val = train_test_split(
        idx_trainval, test_size=val_frac, random_state=seed, stratify=y[idx_trainval]
    )
    if cfg.mean is not None:
        if len(cfg.mean) != x.shape[1]:
            raise DataError(f"data.mean has {len(cfg.mean)} values, the images have {x.shape[1]} channel(s)")
        mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    else:
        mean = x[idx_train].mean(axis=(0, 2, 3))
        std = x[idx_train].std(axis=(0, 2, 3)) + 1e-6
    norm = lambda a: ((a - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)  # noqa: E731
    out = new_workdir("data")
    for name, part in (("train", idx_train), ("val", idx_val), ("test", idx_test)):
        np.save(out / f"x_{name}.npy", norm(x[part]))  # .npy, not .npz: byte-for-byte reproducible
        np.save(out / f"y_{name}.npy", y[part])
    ds = Dataset.write(out, {
        "source": cfg.source,
        "root": str(cfg.root) if cfg.root else None,
        "classes": classes,
        "input_shape": list(x.shape[1:]),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "scale": 16.0 if cfg.source == "digits" else 255.0,
        "data_hash": data_hash,
        "seed": seed,
        "sizes": {"train": len(idx_train), "val": len(idx_val), "test": len(idx_test)},
    })
    log.info(
        "load_data: %s %d images %d classes shape %s -> train %d val %d test %d (data %s)",
        cfg.source, len(y), len(classes), list(x.shape[1:]), len(idx_train), len(idx_val), len(idx_test),
        data_hash[:12],
    )
    return ds
