"""A real-photo ImageFolder cut from photos that ship inside Python packages (no download).

Each class is one real photo (scikit-image's ``skimage.data``, scikit-learn's sample images,
matplotlib's sample data). The photo is split along one axis into three bands, a **train region**, a
**validation region** and a **test region** (by default 50 % / 25 % / 25 %, the held-out bands at one
end), with a few pixels of no-man's-land between neighbours; the crops of each split are cut from its
own region only, so no pixel of a validation or test crop was ever seen in training, and validation
(early stop, selection) says nothing about the test pixels (a bicubic kernel reaches 2 pixels: the gap
is wider). Each crop is a square of random position, size (the same size distribution in every region,
scaled to the smaller held-out band so that held-out crops are not systematically smaller), small
rotation (the rotated square stays inside its region) and horizontal flip, resampled to 224 x 224 and
written as PNG. Deterministic: one seeded generator per class and region.

Held-out regions (``heldout``):

- ``disjoint`` (default): validation and test crops from two regions of their own;
- ``shared``: validation and test crops both drawn at random from one held-out region (the val and test
  bands merged), so that validation predicts test: when validation comes from other regions than test it
  cannot (on one such split a brought model scored 68 % on validation and 94 % on test). Still no pixel
  of a held-out crop was seen in training.

Layouts:

- ``split`` (default): ``root/{train,val,test}/<class>/*.png`` (edgeopt's data loader keeps such a split);
- ``flat``: ``root/<class>/{train,val,test}_NNNN.png`` (for loaders that only know ``root/<class>/``; a
  random split of that folder mixes the regions, so its test accuracy is optimistic).

``root/photos.json`` records the sources, the regions and the counts.

    .venv/bin/python bench/photos.py .edgeopt/bench/brought/photos      # 5 classes, 200 + 50 + 100 crops each
    .venv/bin/python bench/photos.py .edgeopt/photos-small --classes cat coffee --train 40 --val 10 --test 20 --layout flat
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class PhotoClass:
    """One class: a photo from a package, the axis it is split along and which side is held out."""

    name: str
    source: str            # "<package>:<photo>", as loaded by load_photo
    axis: str              # "x": split into left/right; "y": into top/bottom
    test_side: str         # "low" (left/top) or "high" (right/bottom) holds the test region
    content: str           # what the photo shows (for the report)


PHOTOS: Dict[str, PhotoClass] = {c.name: c for c in (
    PhotoClass("cat", "skimage:chelsea", "x", "high", "a tabby cat's face (Chelsea), fur filling the frame"),
    PhotoClass("coffee", "skimage:coffee", "x", "low", "an espresso cup on a saucer on a wooden table"),
    PhotoClass("flower", "sklearn:flower.jpg", "y", "high", "a dahlia against green foliage"),
    PhotoClass("motorcycle", "skimage:motorcycle", "x", "high", "a red motorcycle in a garage (stereo left view)"),
    PhotoClass("temple", "sklearn:china.jpg", "y", "high", "the Summer Palace pagoda above trees and a lake"),
    PhotoClass("rocket", "skimage:rocket", "y", "high", "a rocket on its launch pad at dusk"),
    PhotoClass("astronaut", "skimage:astronaut", "x", "high", "Eileen Collins in her orange flight suit"),
    PhotoClass("officer", "matplotlib:grace_hopper.jpg", "y", "high", "Grace Hopper in navy uniform"),
)}
DEFAULT_CLASSES = ("cat", "coffee", "flower", "motorcycle", "temple")
SIZE = 224
SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.25
TEST_FRACTION = 0.25
GAP = 4                      # pixels between the regions (> the bicubic kernel's reach on both sides)
SCALE = (0.55, 0.95)         # crop side, as a fraction of the largest rotated square the smaller held-out band holds
MAX_ROTATION = 10.0          # degrees


def load_photo(source: str) -> np.ndarray:
    """uint8 H x W x 3 of a photo shipped in a package: skimage:<name>, sklearn:<file>, matplotlib:<file>."""
    package, _, name = source.partition(":")
    if package == "skimage":
        import skimage.data

        img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    elif package == "sklearn":
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name)
    elif package == "matplotlib":
        import matplotlib.cbook
        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as im:
            img = np.asarray(im.convert("RGB"))
    else:
        raise ValueError(f"unknown photo source {source!r}; expected skimage:, sklearn: or matplotlib:")
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


Box = Tuple[float, float, float, float]  # x0, y0, x1, y1 (pixels, x1/y1 exclusive)


def regions(width: int, height: int, cls: PhotoClass, test_fraction: float = TEST_FRACTION,
            val_fraction: float = VAL_FRACTION, gap: int = GAP) -> Dict[str, Box]:
    """The disjoint train, val and test boxes of a ``width`` x ``height`` photo, neighbours ``gap``
    pixels apart: test at the photo's ``test_side`` end, val next to it, train the rest."""
    if not (0 < test_fraction and 0 < val_fraction and test_fraction + val_fraction < 1):
        raise ValueError(f"test and val fractions must be positive and leave a train region, got "
                         f"{test_fraction} and {val_fraction}")
    length = width if cls.axis == "x" else height
    order = ("test", "val", "train") if cls.test_side == "low" else ("train", "val", "test")
    share = {"test": test_fraction, "val": val_fraction, "train": 1 - test_fraction - val_fraction}
    cuts = [0.0]
    for name in order:
        cuts.append(cuts[-1] + share[name] * length)
    spans = {name: (cuts[i] + (gap / 2 if i else 0), cuts[i + 1] - (gap / 2 if i < 2 else 0))
             for i, name in enumerate(order)}

    def box(span: Tuple[float, float]) -> Box:
        return (span[0], 0.0, span[1], float(height)) if cls.axis == "x" else (0.0, span[0], float(width), span[1])

    return {name: box(spans[name]) for name in SPLITS}


def _largest_side(box: Box) -> float:
    """Side of the largest square that fits ``box`` at any rotation up to MAX_ROTATION."""
    t = math.radians(MAX_ROTATION)
    return min(box[2] - box[0], box[3] - box[1]) / (math.cos(t) + math.sin(t))


def crops(img: np.ndarray, box: Box, n: int, side_range: Tuple[float, float], seed: int,
          size: int = SIZE) -> List[np.ndarray]:
    """``n`` ``size`` x ``size`` uint8 crops whose rotated square lies inside ``box``."""
    from PIL import Image

    pil = Image.fromarray(img)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        side = rng.uniform(*side_range)
        angle = math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
        half = side / 2 * (abs(math.cos(angle)) + abs(math.sin(angle)))  # half extent of the rotated square
        if 2 * half > min(box[2] - box[0], box[3] - box[1]):
            continue
        cx, cy = rng.uniform(box[0] + half, box[2] - half), rng.uniform(box[1] + half, box[3] - half)
        k, c, s = side / size, math.cos(angle), math.sin(angle)
        # output pixel (u, v) -> input (cx, cy) + k * R(angle) @ (u - size/2, v - size/2)
        a, b, d, e = k * c, -k * s, k * s, k * c
        coeffs = (a, b, cx - size / 2 * (a + b), d, e, cy - size / 2 * (d + e))
        crop = pil.transform((size, size), Image.AFFINE, coeffs, resample=Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop))
    return out


def build_photo_folder(root: Path, classes: Sequence[str] = DEFAULT_CLASSES, n_train: int = 200, n_test: int = 100,
                       seed: int = 0, layout: str = "split", test_fraction: float = TEST_FRACTION,
                       progress: Optional[Callable[[str], None]] = print, n_val: int = 50,
                       val_fraction: float = VAL_FRACTION, size: int = SIZE,
                       heldout: str = "disjoint") -> Dict[str, object]:
    """Write the ImageFolder under ``root`` (replaced whole, via a temporary folder) and return its
    description (also written to ``root/photos.json``)."""
    from PIL import Image

    if layout not in ("split", "flat"):
        raise ValueError(f"layout: expected 'split' or 'flat', got {layout!r}")
    if heldout not in ("disjoint", "shared"):
        raise ValueError(f"heldout: expected 'disjoint' or 'shared', got {heldout!r}")
    unknown = [c for c in classes if c not in PHOTOS]
    if unknown:
        raise ValueError(f"unknown class {unknown[0]!r}; expected some of {', '.join(PHOTOS)}")
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    described = []
    try:
        for ci, name in enumerate(classes):
            cls = PHOTOS[name]
            img = load_photo(cls.source)
            h, w = img.shape[:2]
            boxes = regions(w, h, cls, test_fraction, val_fraction)
            if heldout == "shared":  # one held-out box: the val and test bands and the gap between them
                v, t = boxes["val"], boxes["test"]
                boxes["val"] = boxes["test"] = (min(v[0], t[0]), min(v[1], t[1]), max(v[2], t[2]), max(v[3], t[3]))
            largest = min(_largest_side(boxes["test"]), _largest_side(boxes["val"]))
            side_range = (SCALE[0] * largest, SCALE[1] * largest)
            counts = {"train": n_train, "val": n_val, "test": n_test}
            for si, split in enumerate(SPLITS):
                folder = tmp / split / name if layout == "split" else tmp / name
                folder.mkdir(parents=True, exist_ok=True)
                prefix = "" if layout == "split" else f"{split}_"
                for i, a in enumerate(crops(img, boxes[split], counts[split], side_range, seed * 1000 + ci * 10 + si, size)):
                    Image.fromarray(a).save(folder / f"{prefix}{name}_{i:04d}.png", optimize=False)
            described.append({**asdict(cls), "photo_size": [w, h], "regions": boxes,
                              "crop_side_px": [round(v, 1) for v in side_range], **{f"n_{k}": v for k, v in counts.items()}})
            if progress:
                progress(f"photos: {name:<11} {cls.source:<28} {w}x{h}  "
                         + "  ".join(f"{k} {tuple(round(v) for v in boxes[k])}" for k in SPLITS)
                         + f"  crop side {side_range[0]:.0f}-{side_range[1]:.0f} px -> {n_train} train + "
                           f"{n_val} val + {n_test} test")
        info = {"layout": layout, "size": size, "heldout": heldout, "seed": seed, "test_fraction": test_fraction,
                "val_fraction": val_fraction, "gap_px": GAP,
                "max_rotation_deg": MAX_ROTATION, "classes": described}
        (tmp / "photos.json").write_text(json.dumps(info, indent=2))
        tmp.chmod(0o755)  # mkdtemp's 0700 would stay with the folder
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def read_split(root: Path, split: str, classes: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x 3 images and int64 labels of ``root/<split>/<class>/*.png`` (split layout)."""
    from PIL import Image

    xs, ys = [], []
    for label, name in enumerate(classes):
        for p in sorted((Path(root) / split / name).glob("*.png")):
            with Image.open(p) as im:
                xs.append(np.asarray(im.convert("RGB")))
            ys.append(label)
    return np.stack(xs), np.asarray(ys, np.int64)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="output folder (replaced)")
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), choices=sorted(PHOTOS))
    p.add_argument("--train", type=int, default=200, help="train crops per class")
    p.add_argument("--val", type=int, default=50, help="validation crops per class")
    p.add_argument("--test", type=int, default=100, help="test crops per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("split", "flat"), default="split")
    p.add_argument("--size", type=int, default=SIZE, help="crop side in pixels")
    p.add_argument("--heldout", choices=("disjoint", "shared"), default="disjoint",
                   help="val and test from regions of their own, or both drawn from one held-out region")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION, help="share of each photo held out for test")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of each photo held out for val")
    a = p.parse_args(argv)
    build_photo_folder(a.root, a.classes, a.train, a.test, a.seed, a.layout, a.test_fraction, n_val=a.val,
                       val_fraction=a.val_fraction, size=a.size, heldout=a.heldout)
    print(f"photos: wrote {a.root} ({a.layout} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
