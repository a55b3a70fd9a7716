"""Peak memory of data at real scale: load_data, then one training epoch streamed from the Dataset.

Generates an ImageFolder of textured shapes as JPEGs (examples/make_shapes.py: 3 classes, noise
grain so that images differ and compress like photos), then in this one process:
  1. load_dataset (first time: hash the files, decode each once into the uint8 cache, write the
     splits and compute the train split's mean/std in a streaming pass),
  2. load_dataset again (unchanged files: hashed, nothing decoded),
  3. one epoch of mobilenet_v3_small forward + backward (plain SGD) over ds.batches("train", ...,
     shuffle=True, normalized=True).
It prints wall time per phase and the peak resident set size (ru_maxrss, of this process and of its
children) after each, and the data's sizes on disk.

    .venv/bin/python bench/data_memory.py                          # 20,000 images at 224x224
    .venv/bin/python bench/data_memory.py --images 600 --size 64   # smoke check (seconds)

Goal (issue 8, point 5): peak RSS at most 3 GB at 20,000 images of 224x224 (3.0 GB of uint8 pixels,
12 GB as float32).
"""

from __future__ import annotations

import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, argument_parser, quiet

GOAL_BYTES = 3 * 1024**3


def peak_rss() -> tuple[int, int]:
    """(this process, its children) peak resident set size in bytes (Linux reports KiB)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def report(phase: str, seconds: float) -> None:
    own, children = peak_rss()
    print(f"{phase:<28} {seconds:8.1f} s   peak RSS {own / 2**20:7.0f} MiB (children {children / 2**20:.0f} MiB)"
          f"   now {current_rss() / 2**20:7.0f} MiB", flush=True)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argument_parser(__doc__)
    ap.add_argument("--images", type=int, default=20_000, help="images in the generated ImageFolder")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (generated and loaded)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the generated images (and the decode cache) here and reuse them next time")
    args = ap.parse_args()
    quiet()
    sys.path.insert(0, str(ROOT))
    from examples.make_shapes import CLASSES, make_shapes

    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgeopt-data-memory-"))
    per_class = -(-args.images // len(CLASSES))  # at least --images in all
    root = work / f"shapes-{per_class}x{len(CLASSES)}-{args.size}"
    try:
        t = time.perf_counter()
        done = root / ".complete"
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)
            make_shapes(root, per_class=per_class, size=args.size, suffix=".jpg", noise=12)
            done.touch()
        report(f"generate {per_class * len(CLASSES)} JPEGs", time.perf_counter() - t)
        print(f"  ImageFolder {root}: {tree_bytes(root) / 2**20:.0f} MiB of JPEG", flush=True)

        import torch

        from edgeopt.config import DataConfig
        from edgeopt.data.sources import load_dataset
        from edgeopt.models.zoo import build_model

        cfg = DataConfig(source="imagefolder", root=root, image_size=(args.size, args.size))
        t = time.perf_counter()
        shutil.rmtree(load_dataset(cfg, seed=0, cache_dir=work / "cache").path)
        report("load_dataset (decode)", time.perf_counter() - t)
        t = time.perf_counter()
        ds = load_dataset(cfg, seed=0, cache_dir=work / "cache")
        report("load_dataset (cached)", time.perf_counter() - t)
        print(f"  Dataset {ds.path}: {ds.size_bytes / 2**20:.0f} MiB uint8, sizes {ds.manifest['sizes']}, "
              f"mean {[round(float(v), 3) for v in ds.mean]} std {[round(float(v), 3) for v in ds.std]}", flush=True)

        torch.manual_seed(0)
        model = build_model("mobilenet_v3_small", len(ds.classes), ds.input_shape[0], 0).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()
        t = time.perf_counter()
        seen, steps = 0, -(-ds.size("train") // args.batch_size)
        for step, (x, y) in enumerate(ds.batches("train", args.batch_size, shuffle=True, seed=0), 1):
            if len(y) < 2:
                continue  # BatchNorm cannot train on a batch of one
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            opt.step()
            seen += len(y)
            if step % max(1, steps // 10) == 0 or step == steps:
                print(f"  step {step}/{steps} loss {loss.item():.3f} "
                      f"({seen / (time.perf_counter() - t):.0f} images/s)", flush=True)
        report(f"1 epoch ({seen} images)", time.perf_counter() - t)
        shutil.rmtree(ds.path, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    own, children = peak_rss()
    verdict = "OK" if max(own, children) <= GOAL_BYTES else "OVER"
    print(f"peak RSS {own / 2**30:.2f} GiB (children {children / 2**30:.2f} GiB); goal <= 3 GiB: {verdict}")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
