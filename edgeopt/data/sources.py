"""Datasets: scikit-learn's bundled digits (the embedded default) and ImageFolder trees.

Both end as one :class:`~edgeopt.artifacts.Dataset`: per split, uint8 images at the configured size
and int64 labels, with the per-channel mean and std (the train split's, unless configured) in the
manifest. Nothing here holds more than a block of images in memory, so a folder larger than memory
loads, and the training code streams it back a batch at a time.

ImageFolder layouts:

- ``root/<class>/...``: split at random, stratified and seeded, by the ``data.split`` fractions;
- ``root/train/<class>/...`` and ``root/test/<class>/...`` (and optionally ``root/val/<class>/...``):
  the user's split is kept; without ``val/``, a ``data.split.val`` fraction of train is carved out
  as validation, stratified and seeded.

Class ``i`` is the ``i``-th folder name in sorted order, or in the label map's order (``data.labels``: a
labels.txt or labels.json file, or a list) so that a brought model's output index means the same class.

Each image is decoded once, by the decoder the server uses too (:func:`edgeopt.data.images.decode_image`).
The decoded array is cached under the state dir, keyed by a hash of the raw files (their bytes and
relative paths: read, not decoded) with the size and mode. ``load_data`` always runs, so a re-run over
unchanged files costs one read of the bytes and decodes nothing. That hash is also the manifest's
``data_hash``: a changed dataset is visible (and invalidates ZenML's cache), an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from edgeopt.artifacts import Dataset, new_workdir
from edgeopt.artifacts.npyrows import NpyRows, NpyWriter
from edgeopt.config import DataConfig, resolve_path, state_dir
from edgeopt.data import images
from edgeopt.data.labels import in_label_order, read_label_map

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = images.SUFFIXES
SPLITS = ("train", "val", "test")
BLOCK = 64  # images per read/write while building the splits: 9.6 MB at 3 x 224 x 224
MIN_PER_CLASS = 3  # one each for train, val and test
KEEP_DECODED = 4  # decoded datasets kept in the cache (a 224x224 one of 20,000 images is 3 GB)

Take = Callable[[np.ndarray], np.ndarray]  # row indices -> uint8 N x C x H x W images


class DataError(ValueError):
    """A problem with the user's data, phrased for the user (names the file or folder)."""


@dataclass(frozen=True)
class _Folder:
    """An ImageFolder's labelled files in a fixed order; for a pre-split tree, each file's index in SPLITS."""

    root: Path
    classes: List[str]
    files: List[Path]
    labels: np.ndarray
    split_of: Optional[np.ndarray]


def load_dataset(cfg: DataConfig, seed: int = 0, *, cache_dir: Optional[Path] = None) -> Dataset:
    """Load, split and write the Dataset folder; ImageFolder images are decoded once into ``cache_dir``.

    ``cache_dir`` defaults to ``<state dir>/cache``. Every problem with the data raises a one-line
    :class:`DataError` naming the file or folder: the tree's shape is checked before anything is
    read, each file as it is decoded, and the split (a matter of counts) after decoding, so a broken
    file is reported before a split it would have been part of.
    """
    stats = _statistics(cfg)
    crop = cfg.resize.crop
    if cfg.source == "digits":
        pixels, y, classes, data_hash = _load_digits(cfg.image_size, crop)
        parts = _random_split(y, cfg, seed, [f"digits class {c!r}" for c in classes], "digits")
        take: Take = pixels.__getitem__
        shape, scale, decoded, layout = pixels.shape[1:], 16.0, 0, "random"
    else:
        if cfg.root is None:
            raise DataError("data.root: required when data.source is 'imagefolder'")
        folder = _scan(resolve_path(cfg.root), label_map(cfg))
        classes, y = folder.classes, folder.labels
        mode = "L" if cfg.grayscale else "RGB"
        data_hash = _hash_files(folder, cfg.image_size, mode, crop, ordered=cfg.labels is not None)
        rows, decoded = _decoded(folder, cfg.image_size, mode, data_hash, cache_dir or state_dir() / "cache", crop)
        if folder.split_of is None:
            names = [str(folder.root / c) for c in classes]
            parts, layout = _random_split(y, cfg, seed, names, str(folder.root)), "random"
        else:
            parts, layout = _given_split(folder, cfg, seed), "pre-split"
        take, shape, scale = rows.read, rows.shape[1:], 255.0
    out = new_workdir("data")
    sums, squares = _write_splits(out, take, y, parts, shape)
    if stats is not None:
        mean, std = np.asarray(stats[0], np.float32), np.asarray(stats[1], np.float32)
    else:
        mean, std = _mean_std(sums, squares, len(parts["train"]) * shape[1] * shape[2], scale)
    input_shape = [int(s) for s in shape]
    sizes = {name: int(len(idx)) for name, idx in parts.items()}
    resize = {"resize": cfg.resize.model_dump()} if crop is not None else {}  # only when not the default stretch
    ds = Dataset.write(out, {
        **resize,
        "source": cfg.source,
        "root": str(cfg.root) if cfg.root else None,
        "layout": layout,
        "classes": classes,
        "input_shape": input_shape,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "scale": scale,
        "data_hash": data_hash,
        "seed": seed,
        "sizes": sizes,
    })
    log.info(
        "load_data: %s %d images %d classes shape %s (%s) -> train %d val %d test %d; decoded %d, from cache %d (data %s)",
        cfg.source, len(y), len(classes), input_shape, layout, sizes["train"], sizes["val"], sizes["test"],
        decoded, 0 if cfg.source == "digits" else len(y) - decoded, data_hash[:12],
    )
    return ds


def check_data(cfg: DataConfig, seed: int = 0) -> int:
    """Pre-flight: refuse data a run cannot use before any step starts, decoding nothing; return the image count.

    For an ImageFolder: the tree's shape (classes, empty class folders, the pre-split layout), every
    file's header (empty, not an allowed format, corrupt, or more pixels than the decoder takes) and
    whether the split can be drawn (images per class). Each problem is the :class:`DataError` that
    :func:`load_dataset` would raise later, naming the file or folder. Digits need no check.
    """
    _statistics(cfg, decided=False)
    if cfg.source == "digits":
        return 0
    if cfg.root is None:
        raise DataError("data.root: required when data.source is 'imagefolder'")
    folder = _scan(resolve_path(cfg.root), label_map(cfg))
    for p in folder.files:
        _check_header(p)
    if folder.split_of is None:
        _random_split(folder.labels, cfg, seed, [str(folder.root / c) for c in folder.classes], str(folder.root))
    else:
        _given_split(folder, cfg, seed)
    return len(folder.files)


def _statistics(cfg: DataConfig, decided: bool = True) -> Optional[Tuple[List[float], List[float]]]:
    """The configured (mean, std), checked against the images' channels; None: the train split's (or, unless
    ``decided``, ``auto``: to be decided before the run)."""
    channels = 3 if cfg.source == "imagefolder" and not cfg.grayscale else 1
    if not decided and cfg.mean == "auto":
        return None
    try:
        stats = cfg.statistics()
    except ValueError as err:
        raise DataError(str(err)) from None
    if stats is not None and len(stats[0]) != channels:
        raise DataError(f"data.mean has {len(stats[0])} values, the images have {channels} channel(s)")
    return stats


def label_map(cfg: DataConfig) -> Optional[List[str]]:
    """``data.labels`` read (:func:`edgeopt.data.labels.read_label_map`); None: sorted folder names."""
    try:
        return read_label_map(cfg.labels)
    except ValueError as err:
        raise DataError(str(err)) from None


def _check_header(path: Path) -> None:
    """The file opens as an allowed format within the pixel limit, and its chunks check out (Pillow's
    ``verify``: CRCs and structure where the format has them); no pixel is decoded."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        with Image.open(path, formats=images.FORMATS) as im:
            width, height = im.size
            if width * height > images.MAX_PIXELS:
                raise DataError(f"{path}: image of {width}x{height} pixels is larger than {images.MAX_PIXELS} pixels")
            im.verify()
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (not one of {', '.join(images.FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: image larger than {images.MAX_PIXELS} pixels") from None
    except Exception as err:  # noqa: BLE001 - a header Pillow cannot parse: the file is not a usable image
        reason = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"{path}: not a readable image ({type(err).__name__}{': ' if reason else ''}{reason})") from None


def _load_digits(size: Optional[Tuple[int, int]] = None,
                 crop: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray, List[str], str]:
    """Digits as uint8: their values are 0..16, stored exactly and divided by 16 (``scale``) as before;
    resized (bilinear, values still 0..16; centre-cropped with ``crop``) when ``size`` [height, width] is given."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = d.images.astype(np.uint8)
    if size is not None:
        pixels = np.stack([np.asarray(images.resize(Image.fromarray(im), size, crop)) for im in pixels])
    x = pixels[:, None, :, :]
    y = d.target.astype(np.int64)
    return x, y, [str(c) for c in d.target_names], hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


def _subfolders(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_folders(root: Path) -> List[str]:
    """The class names of an ImageFolder (of its ``train/`` when the tree is pre-split), reading no image."""
    subdirs = _subfolders(root)
    return _subfolders(root / "train") if {"train", "test"} <= set(subdirs) else subdirs


def _images_in(folder: Path) -> List[Path]:
    """Image files under ``folder`` by suffix, sorted; hidden ones (``.DS_Store``, ``._x.jpg``) skipped."""
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _scan(root: Path, names: Optional[List[str]] = None) -> _Folder:
    """Find the classes (in the label map's order, when there is one) and files, and whether ``root`` is
    pre-split; check the tree's shape."""
    subdirs = _subfolders(root)
    presplit = {"train", "test"} <= set(subdirs)
    if presplit:
        others = [d for d in subdirs if d not in SPLITS]
        if others:
            raise DataError(f"{root}: has train/ and test/ (a pre-split layout) and also {', '.join(others)}/: "
                            "move each into a split or out of the root")
        present = [s for s in SPLITS if s in subdirs]
        classes = class_folders(root)
        for s in present[1:]:
            got = _subfolders(root / s)
            if got != classes:
                diff = [f"{word} {', '.join(names)}" for word, names in (
                    ("missing", sorted(set(classes) - set(got))), ("extra", sorted(set(got) - set(classes)))) if names]
                raise DataError(f"{root / s}: class folders differ from {root / 'train'}'s ({'; '.join(diff)})")
        bases = [(root / s, SPLITS.index(s)) for s in present]
    else:
        classes, bases = subdirs, [(root, -1)]
    if names is not None:
        try:
            classes = in_label_order(classes, names, root / "train" if presplit else root)
        except ValueError as err:
            raise DataError(str(err)) from None
    if len(classes) < 2:
        where = root / "train" if presplit else root
        raise DataError(f"{where}: an ImageFolder needs at least two class folders, found {len(classes)}")
    files: List[Path] = []
    labels: List[int] = []
    split_of: List[int] = []
    for base, split_index in bases:
        for i, c in enumerate(classes):
            found = _images_in(base / c)
            if not found:
                raise DataError(f"{base / c}: class folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
            labels += [i] * len(found)
            split_of += [split_index] * len(found)
    return _Folder(root, classes, files, np.asarray(labels, np.int64), np.asarray(split_of) if presplit else None)


def _random_split(y: np.ndarray, cfg: DataConfig, seed: int, class_names: List[str], where: str) -> Dict[str, np.ndarray]:
    """Stratified, seeded train/val/test indices by the configured fractions."""
    from sklearn.model_selection import train_test_split  # here: 1.5 s of import that validating a config skips

    counts = np.bincount(y, minlength=len(class_names))
    if counts.min() < MIN_PER_CLASS:
        c = int(counts.argmin())
        raise DataError(f"{class_names[c]}: {counts[c]} image(s); each class needs at least {MIN_PER_CLASS} "
                        "(one each for train, val and test)")
    idx = np.arange(len(y))
    try:
        trainval, test = train_test_split(idx, test_size=cfg.split.test, random_state=seed, stratify=y)
        train, val = train_test_split(trainval, test_size=cfg.split.val / (1 - cfg.split.test), random_state=seed,
                                      stratify=y[trainval])
    except ValueError as err:
        raise DataError(f"{where}: too few images for a stratified train/val/test split ({err})") from None
    return {"train": train, "val": val, "test": test}


def _given_split(folder: _Folder, cfg: DataConfig, seed: int) -> Dict[str, np.ndarray]:
    """The tree's own split, each in a seeded random order; val carved out of train when absent."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    parts = {s: rng.permutation(np.flatnonzero(folder.split_of == i)) for i, s in enumerate(SPLITS)}
    if len(parts["val"]):
        return parts
    train = parts["train"]
    counts = np.bincount(folder.labels[train], minlength=len(folder.classes))
    if counts.min() < 2:
        c = int(counts.argmin())
        raise DataError(f"{folder.root / 'train' / folder.classes[c]}: {counts[c]} image; carving a validation "
                        "split out of train needs at least 2 per class (or add a val/ folder)")
    try:
        parts["train"], parts["val"] = train_test_split(train, test_size=cfg.split.val, random_state=seed,
                                                        stratify=folder.labels[train])
    except ValueError as err:
        raise DataError(f"{folder.root / 'train'}: too few images to carve a stratified validation split ({err})") from None
    return parts


def _hash_files(folder: _Folder, size: Optional[Tuple[int, int]], mode: str, crop: Optional[float] = None,
                ordered: bool = False) -> str:
    """sha256 over every file's relative path and bytes (not its pixels), the size and the mode; the centre
    crop and the class order when they are not the defaults (stretch, sorted folder names)."""
    h = hashlib.sha256()
    for p in folder.files:
        rel = p.relative_to(folder.root).as_posix().encode()
        file_hash = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    file_hash.update(chunk)
        except OSError as err:
            raise DataError(f"{p}: cannot read ({err.strerror or err})") from None
        h.update(len(rel).to_bytes(8, "little") + rel + file_hash.digest())
    h.update(f"size={list(size) if size else None};mode={mode}".encode())
    if crop is not None:
        h.update(f";center_crop={crop}".encode())
    if ordered:
        h.update(f";classes={json.dumps(folder.classes)}".encode())
    return h.hexdigest()


def _decoded(folder: _Folder, size: Optional[Tuple[int, int]], mode: str, data_hash: str,
             cache: Path, crop: Optional[float] = None) -> Tuple[NpyRows, int]:
    """The folder's images as uint8 N x C x H x W in file order, and how many were decoded (0: cached).

    The entry is written under a temporary name and renamed when complete, so a crash or a
    concurrent run never leaves (or reads) half an array; the least recently used entries beyond
    :data:`KEEP_DECODED` are removed.
    """
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{data_hash};decoder={images.VERSION};pillow={PIL.__version__}".encode()).hexdigest()
    entry = cache / f"decoded-{key[:32]}"
    decoded = 0
    if not (entry / "images.npy").is_file():
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
        try:
            _decode_all(folder, size, mode, partial / "images.npy", crop)
            try:
                partial.rename(entry)
            except OSError:
                if not (entry / "images.npy").is_file():
                    raise
            decoded = len(folder.files)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    os.utime(entry)
    _evict(cache, entry)
    return NpyRows(entry / "images.npy"), decoded


def _decode_all(folder: _Folder, size: Optional[Tuple[int, int]], mode: str, dest: Path,
                crop: Optional[float] = None) -> None:
    files = folder.files
    first = _decode(files[0], size, mode, crop)
    c, h, w = (1, *first.shape) if first.ndim == 2 else (first.shape[2], *first.shape[:2])
    start, step = time.monotonic(), max(1, len(files) // 10)
    with NpyWriter(dest, (len(files), c, h, w), np.uint8) as out:
        for i, p in enumerate(files):
            a = first if i == 0 else _decode(p, size, mode, crop)
            if a.shape != first.shape:
                raise DataError(f"{p}: {a.shape[1]}x{a.shape[0]} pixels, but {files[0]} has {w}x{h}; "
                                "set data.image_size to resize every image to one size")
            out.write(a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None])
            if (i + 1) % step == 0 or i + 1 == len(files):
                elapsed = time.monotonic() - start
                log.info("load_data: decoded %d/%d images (%.0f/s)", i + 1, len(files), (i + 1) / max(elapsed, 1e-9))


def _decode(path: Path, size: Optional[Tuple[int, int]], mode: str, crop: Optional[float] = None) -> np.ndarray:
    try:
        return images.decode_image(path, size, mode, crop=crop)
    except images.ImageError as err:
        raise DataError(str(err)) from None


def _evict(cache: Path, keep: Path) -> None:
    """Remove the least recently used decoded datasets beyond KEEP_DECODED, never ``keep``."""
    def last_used(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    others = sorted((p for p in cache.glob("decoded-*") if p != keep), key=last_used, reverse=True)
    for old in others[KEEP_DECODED - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _write_splits(out: Path, take: Take, y: np.ndarray, parts: Dict[str, np.ndarray],
                  shape: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """Write each split's images and labels a block at a time.

    Returns the train split's per-channel sums of pixel values and of their squares, as exact
    integers (a squared uint8 fits uint16), for :func:`_mean_std`.
    """
    sums, squares = np.zeros(shape[0], np.int64), np.zeros(shape[0], np.int64)
    for name, idx in parts.items():
        with NpyWriter(out / f"images_{name}.npy", (len(idx), *shape), np.uint8) as writer:
            for start in range(0, len(idx), BLOCK):
                block = take(idx[start:start + BLOCK])
                writer.write(block)
                if name == "train":
                    wide = block.astype(np.uint16)
                    sums += wide.sum(axis=(0, 2, 3), dtype=np.int64)
                    squares += np.square(wide, out=wide).sum(axis=(0, 2, 3), dtype=np.int64)
        np.save(out / f"y_{name}.npy", y[idx])  # .npy, not .npz: byte-for-byte reproducible
    return sums, squares


def _mean_std(sums: np.ndarray, squares: np.ndarray, count: int, scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the pixels scaled to [0, 1], from exact integer sums over ``count`` pixels.

    The variance's numerator ``count * squares - sums**2`` is computed in Python integers, exactly
    (in float64 the two terms, near 1e22 at 20,000 images, would cancel away the digits that matter).
    """
    mean = [int(s) / count / scale for s in sums]
    var = [(count * int(q) - int(s) ** 2) / count**2 / scale**2 for s, q in zip(sums, squares)]
    return np.asarray(mean, np.float32), (np.sqrt(np.asarray(var)) + 1e-6).astype(np.float32)
