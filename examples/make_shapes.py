"""Generate examples/shapes: a small ImageFolder (circle / square / triangle, 32x32 RGB PNGs).

It stands in for a user's own images in configs/imagefolder.yaml, in the tests and (as 224x224
textured JPEGs) in bench/data_memory.py:
    python examples/make_shapes.py [out_dir] [images_per_class]
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


def make_shapes(out: Path, per_class: int = 40, size: int = 32, seed: int = 0, *,
                suffix: str = ".png", noise: float = 0.0) -> Path:
    """Write ``per_class`` images of each shape under ``out/<class>/``.

    ``noise`` adds that much Gaussian grain (in 0..255 units) so that images differ in texture, not
    only in colour and position, and compress like photos rather than like flat drawings.
    """
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = tuple(int(c) for c in rng.integers(0, 90, 3))
            fg = tuple(int(c) for c in rng.integers(150, 256, 3))
            im = Image.new("RGB", (size, size), bg)
            d = ImageDraw.Draw(im)
            r = rng.uniform(0.22, 0.4) * size
            cx, cy = rng.uniform(r, size - r, 2)
            if cls == "circle":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
            elif cls == "square":
                d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
            else:
                d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
            if noise:
                grain = rng.normal(0, noise, (size, size, 1)).astype(np.float32)
                im = Image.fromarray(np.clip(np.asarray(im, np.float32) + grain, 0, 255).astype(np.uint8))
            path = out / cls / f"{cls}_{i:03d}{suffix}"
            if suffix == ".png":
                im.save(path, optimize=True)
            else:
                im.save(path, quality=90)
    return out


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "shapes"
    make_shapes(out, int(sys.argv[2]) if len(sys.argv) > 2 else 40)
    print(f"wrote {out}")
