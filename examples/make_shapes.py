"""Generate examples/shapes: a small ImageFolder (circle / square / triangle, 32x32 RGB PNGs).

It stands in for a user's own images in configs/imagefolder.yaml and in the tests:
    python examples/make_shapes.py [out_dir] [images_per_class]
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_shapes(out: Path, per_class: int = 40, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls in ("circle", "square", "triangle"):
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
            im.save(out / cls / f"{cls}_{i:03d}.png", optimize=True)
    return out


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "shapes"
    make_shapes(out, int(sys.argv[2]) if len(sys.argv) > 2 else 40)
    print(f"wrote {out}")
