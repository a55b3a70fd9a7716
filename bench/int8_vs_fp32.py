"""INT8 vs FP32 latency of ResNet-18 and MobileNetV2 (MobileNetV3-small on request) on the same
runtime, and edgeopt's default INT8 recipe against the best INT8 recipe measured, in one run.

Each model (torchvision, random init: latency does not depend on the weights' values; BatchNorm
statistics are set from the calibration images so activations have a trained network's scale) is
exported to ONNX with edgeopt.models.export and quantized with edgeopt.precisions' own functions:
  - ONNX Runtime: FP32 ONNX vs static QDQ INT8 ONNX (per-channel, MinMax) with
      * edgeopt's default recipe (``onnxruntime.activation_type: auto``, ``reduce_range: auto``,
        resolved for this CPU),
      * U8S8 (uint8 activations) and S8S8 (int8 activations), both without reduce_range;
  - OpenVINO: FP32 IR vs NNCF INT8 IR with
      * edgeopt's default int8 recipe, built by the recipe itself (mixed preset, CPU config, full bias
        correction; ``ignore_first: auto`` builds every-layer INT8 and first-layer-float, measures both
        on this CPU and keeps the fastest within the 0.5-point budget: edgeopt.precisions.int8_choice),
      * every layer quantized (``nncf.ignore_first: false``) and the first layer in float (``true``);
      * on a CPU with AVX512_BF16 or AMX-BF16: edgeopt's default int8-bf16 recipe and the same two
        NNCF IRs with their float layers in bf16;
all calibrated on the same random-normal images. The val images that ``auto`` measures accuracy on
are labelled with the FP32 model's own top-1 (random weights have no true labels): the third of
3 x ``--val`` random-normal images that FP32 separates best (largest top-1 - top-2 logit margin),
as a trained model separates most of its val set; on all of them INT8 agreed with FP32 on only
83-87 % of ResNet-18's top-1s here (near-ties among 1000 random classes), which no real model's
drop resembles. A candidate's val accuracy is its top-1 agreement with FP32. Every predictor is timed with
edgeopt.measure.latency.measure in one process, on the same input, with the same thread count,
interleaved; the whole measurement is repeated (--repeats) and every ratio is taken within one
repetition. How much of each INT8 model the runtime really executes in INT8 is read with
edgeopt.runtimes.coverage.int8_coverage (the graph the runtime optimized / compiled).

    .venv/bin/python bench/int8_vs_fp32.py                       # full: 200 iterations x 3 repetitions
    .venv/bin/python bench/int8_vs_fp32.py --models resnet18     # ResNet-18 only
    .venv/bin/python bench/int8_vs_fp32.py --quick               # smoke check

Goals: edgeopt's default INT8 recipe (int8 on OpenVINO IR, as resolved on this CPU) within 10 % of
the best INT8 recipe measured, i.e. at >= 90 % of its speed (issue 19; it printed 63 % on an AMX
Xeon when the default kept the first layer in float); issue 8: ResNet-18 INT8 >= 3.5x faster than
FP32 on the best runtime (about 4x is the limit on a CPU with AVX512-VNNI), edgeopt's default ORT
recipe within 10 % of the best ORT recipe, no INT8 recipe of edgeopt's defaults slower than its
FP32. On a CPU without VNNI the script says so and shows why the INT8 figures are lower.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np
from _common import argument_parser, fingerprint_line, load_line, median, quiet, silenced, span, verdict

GOAL_SPEEDUP, GOAL_DEFAULT_VS_BEST = 3.5, 0.9
MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small")
DEFAULT_MODELS = MODELS[:2]  # MobileNetV3-small on request: its INT8 does not pay on either runtime (see README)
INPUT_SHAPE = (3, 224, 224)


class BenchInputs:
    """What a precision recipe reads (edgeopt.precisions.Inputs): the calibration images, and val
    images labelled with the FP32 model's top-1."""

    def __init__(self, calibration: np.ndarray, val: np.ndarray, labels: np.ndarray):
        self.calibration, self.val, self.labels = calibration, val, labels

    def validation(self) -> Iterator[Tuple[np.ndarray, int]]:
        return ((self.val[i : i + 1], int(self.labels[i])) for i in range(len(self.val)))


@dataclass(frozen=True)
class Row:
    """One INT8 recipe on one runtime, compared with the FP32 model on that runtime."""

    label: str
    runtime: str
    default: bool  # edgeopt's default recipe for that runtime's format (precision int8, or int8-bf16)
    build: Callable[[Path, Path, BenchInputs], object]  # FP32 model file, INT8 model file, inputs -> facts


def rows() -> List[Row]:
    from edgeopt import precisions
    from edgeopt.config.quant import NNCFOptions, OrtOptions
    from edgeopt.measure.latency import cpu_info
    from edgeopt.precisions import nncf_backend, ort
    from edgeopt.precisions.native import BF16_FLAGS
    from edgeopt.runtimes.openvino import save_with_precision

    def ort_row(label: str, options: OrtOptions, default: bool = False) -> Row:
        return Row(label, "onnxruntime", default,
                   lambda src, dst, inputs: ort.quantize_static_qdq(src, dst, inputs.calibration, options))

    def recipe_row(label: str, precision: str) -> Row:  # the recipe itself, with its default options
        recipe = precisions.get(precision)
        return Row(label, "openvino", True,
                   lambda src, dst, inputs: recipe.implementation("openvino")(src, dst, recipe.Options(), inputs))

    def nncf_row(label: str, options: NNCFOptions, hint: str | None = None) -> Row:
        def build(src: Path, dst: Path, inputs: BenchInputs) -> object:
            if hint is None:
                return nncf_backend.quantize(src, dst, "openvino", inputs.calibration, options)
            plain = dst.with_name(f"plain-{dst.name}")
            nncf_backend.quantize(src, plain, "openvino", inputs.calibration, options)
            return save_with_precision(plain, dst, hint)

        return Row(label, "openvino", False, build)

    act, rr = ort.activation_type(OrtOptions()), ort.reduce_range(OrtOptions())
    out = [
        ort_row(f"ORT edgeopt ({'U8S8' if act == 'uint8' else 'S8S8'}{' rr' if rr else ''})", OrtOptions(), True),
        ort_row("ORT U8S8", OrtOptions(activation_type="uint8", reduce_range=False)),
        ort_row("ORT S8S8", OrtOptions(activation_type="int8", reduce_range=False)),
        recipe_row("OV edgeopt int8", "int8"),
        nncf_row("OV NNCF all layers", NNCFOptions(ignore_first=False)),
        nncf_row("OV NNCF first float", NNCFOptions(ignore_first=True)),
    ]
    if cpu_info()[1] & set(BF16_FLAGS):
        out += [recipe_row("OV edgeopt int8-bf16", "int8-bf16"),
                nncf_row("OV all layers, bf16", NNCFOptions(ignore_first=False), "bf16"),
                nncf_row("OV first float, bf16", NNCFOptions(ignore_first=True), "bf16")]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS),
                   help=f"torchvision models to measure (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--threads", type=int, default=1, help="inference threads of every runtime (default 1)")
    p.add_argument("--calibration", type=int, default=32, help="random-normal calibration images (default 32)")
    p.add_argument("--val", type=int, default=200,
                   help="random-normal val images labelled by FP32's top-1, for auto and agreement (default 200)")
    p.add_argument("--iterations", type=int, default=200, help="timed inferences per model per repetition")
    p.add_argument("--warmup", type=int, default=20, help="untimed inferences after the first one")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per repetition")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of the whole interleaved measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep the exported models here (default: a temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 20 iterations, 1 repetition, 8 calibration images, 32 val images")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.warmup, args.rounds, args.repeats, args.calibration, args.val = 20, 3, 2, 1, 8, 32
    return args


def set_batchnorm_statistics(model, images: np.ndarray) -> None:
    """BatchNorm running statistics from ``images`` (as training would set them), then eval mode.

    With torchvision's default init the activations shrink layer after layer (MobileNetV2's logits
    come out around 1e-9); with real statistics every layer sees unit-scale activations, as in a
    trained network, so calibration ranges and the INT8-vs-FP32 logit check are representative.
    """
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batch below
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
    model.eval()


def build_models(name: str, recipes: List[Row], folder: Path, calibration: np.ndarray, pool: np.ndarray,
                 seed: int) -> Tuple[Dict[str, Path], Dict[str, object], np.ndarray]:
    """Model files of one torchvision model, "fp32:<runtime>" and "int8:<row label>"; what each row's
    build returned (the recipes: their manifest facts); the val images (the third of ``pool`` that
    FP32 separates best)."""
    import torch
    import torchvision

    from edgeopt import formats
    from edgeopt.models.export import export_onnx
    from edgeopt.runtimes import make_predictor

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    set_batchnorm_statistics(model, calibration)
    onnx_fp32 = export_onnx(model, INPUT_SHAPE, folder / f"{name}.fp32.onnx")
    (folder / f"{name}-ir").mkdir(exist_ok=True)
    files = {"fp32:onnxruntime": onnx_fp32, "fp32:openvino": formats.get("openvino").from_onnx(onnx_fp32, folder / f"{name}-ir")}
    logits = make_predictor("openvino", files["fp32:openvino"]).predict_batched(pool, 64)
    top2 = np.sort(logits, 1)[:, -2:]
    keep = np.sort(np.argsort(top2[:, 0] - top2[:, 1])[: len(pool) // 3])  # the largest margins
    val = pool[keep]
    inputs, facts = BenchInputs(calibration, val, logits[keep].argmax(1)), {}
    for i, row in enumerate(recipes):
        src = files[f"fp32:{row.runtime}"]
        dst = folder / f"{name}.int8-{i}{src.suffix}"
        facts[row.label] = row.build(src, dst, inputs)
        files[f"int8:{row.label}"] = dst
    return files, facts, val


def default_vs_best(name: str, recipes: List[Row], p50: Dict[tuple, List[float]], chosen: Dict[tuple, dict]) -> str:
    """edgeopt's default recipes on OpenVINO IR (int8, and int8-bf16 where measured) against the fastest
    INT8 recipe of the loop: best p50 / default p50 of the same repetition, the median over them."""
    best = min(recipes, key=lambda row: median(p50[name, f"int8:{row.label}"]))
    lines = [f"{name}: the fastest INT8 recipe measured: {best.label} ({median(p50[name, f'int8:{best.label}']):.2f} ms)"]
    for row in (r for r in recipes if r.default and r.runtime == "openvino"):
        rel = [b / d for b, d in zip(p50[name, f"int8:{best.label}"], p50[name, f"int8:{row.label}"])]
        won = chosen.get((name, row.label), {}).get("winner", "set")
        lines.append(f"  edgeopt's default {row.label} (auto -> {won}), {median(p50[name, f'int8:{row.label}']):.2f} ms: "
                     f"default within {max(0.0, 100 * (1 - median(rel))):.1f} % of the best (at {span(rel, '{:.0%}')} of its "
                     f"speed; goal >= {GOAL_DEFAULT_VS_BEST:.0%}) -> {verdict(median(rel) >= GOAL_DEFAULT_VS_BEST)}")
    return "\n".join(lines)


def model_bytes(path: Path) -> int:
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    from edgeopt.measure.latency import cpu_fingerprint, int8_warning, measure
    from edgeopt.runtimes import make_predictor
    from edgeopt.runtimes.coverage import int8_coverage

    recipes = rows()
    fp = cpu_fingerprint()
    print(fingerprint_line(fp))
    print(load_line("at the start"))
    print(f"threads {args.threads}, batch 1, {INPUT_SHAPE[1]}x{INPUT_SHAPE[2]}, random init, {args.calibration} "
          f"random-normal calibration images; {args.iterations} iterations x {args.repeats} repetition(s), "
          f"{args.rounds} interleaved rounds each")
    rng = np.random.default_rng(args.seed)
    calibration = rng.standard_normal((args.calibration, *INPUT_SHAPE), dtype=np.float32)
    x = rng.standard_normal((1, *INPUT_SHAPE), dtype=np.float32)  # the one input every predictor sees
    x_check = rng.standard_normal((8, *INPUT_SHAPE), dtype=np.float32)
    pool = rng.standard_normal((3 * args.val, *INPUT_SHAPE), dtype=np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        predictors, notes, chosen = {}, {}, {}
        for name in args.models:
            print(f"exporting and quantizing {name} ...", flush=True)
            with silenced():
                files, facts, val = build_models(name, recipes, folder, calibration, pool, args.seed)
            chosen.update({(name, k): f["int8_choice"] for k, f in facts.items()
                           if isinstance(f, dict) and "int8_choice" in f})
            for rt in ("onnxruntime", "openvino"):
                predictors[name, f"fp32:{rt}"] = make_predictor(rt, files[f"fp32:{rt}"], args.threads)
            for row in recipes:
                fp32, key = predictors[name, f"fp32:{row.runtime}"], f"int8:{row.label}"
                int8 = predictors[name, key] = make_predictor(row.runtime, files[key], args.threads)
                sizes = [model_bytes(files[f"fp32:{row.runtime}"]) / 1e6, model_bytes(files[key]) / 1e6]
                cov = int8_coverage(row.runtime, files[key], args.threads)
                notes[name, row.label] = {
                    "size": f"{sizes[0]:.1f} -> {sizes[1]:.1f} MB",
                    "cos": cosine(fp32.predict_batched(x_check), int8.predict_batched(x_check)),
                    "agree": float((fp32.predict_batched(val, 64).argmax(1) == int8.predict_batched(val, 64).argmax(1))
                                   .mean()),
                    "int8": f"{cov['int8_ops']}/{cov['int8_ops'] + cov['float_ops']}",
                }

        p50: Dict[tuple, List[float]] = {k: [] for k in predictors}
        for r in range(args.repeats):
            print(f"measuring, repetition {r + 1}/{args.repeats} ...", flush=True)
            lat = measure({"/".join(k): p for k, p in predictors.items()}, x, warmup=args.warmup,
                          iterations=args.iterations, rounds=args.rounds)
            for k in predictors:
                p50[k].append(lat["/".join(k)].p50_ms)

    print()
    print(f"{'model':<13} {'INT8 recipe':<22} {'FP32 p50 ms':>20} {'INT8 p50 ms':>20} {'INT8/FP32 speedup':>20}  "
          f"{'size':>16}  {'logit cos':>9}  {'top-1 agree':>11}  conv/matmul layers run in INT8")
    speedup: Dict[tuple, float] = {}
    for name in args.models:
        for row in recipes:
            f, i = p50[name, f"fp32:{row.runtime}"], p50[name, f"int8:{row.label}"]
            ratios = [a / b for a, b in zip(f, i)]
            speedup[name, row.label] = median(ratios)
            n = notes[name, row.label]
            print(f"{name:<13} {row.label:<22} {span(f):>20} {span(i):>20} {span(ratios) + 'x':>20}  "
                  f"{n['size']:>16}  {n['cos']:>9.4f}  {n['agree']:>11.1%}  {n['int8']}")
    print(f"(median [min-max] over the repetitions; each speedup is FP32 p50 / INT8 p50 of the same repetition, "
          f"on the same runtime; logit cos: INT8 vs FP32 logits on 8 other random images; top-1 agree: with FP32 on "
          f"the {args.val} val images FP32 separates best; layers: edgeopt.runtimes.coverage on the graph the runtime runs)")
    for (name, label), choice in chosen.items():
        print(f"{name} {label}: auto resolved on {choice['resolved_for_cpu']}: {choice['why']}")

    print()
    for name in args.models:
        print(default_vs_best(name, recipes, p50, chosen))
    print()
    for name in args.models:
        best = max(recipes, key=lambda row: speedup[name, row.label])
        best_ort = max((r for r in recipes if r.runtime == "onnxruntime"), key=lambda row: speedup[name, row.label])
        default_ort = next(r for r in recipes if r.runtime == "onnxruntime" and r.default)
        rel = speedup[name, default_ort.label] / speedup[name, best_ort.label]
        slower = [r.label for r in recipes if r.default and speedup[name, r.label] < 1]
        print(f"{name}: best INT8/FP32 speedup {speedup[name, best.label]:.2f}x ({best.label}); edgeopt's default "
              f"ORT recipe at {rel:.0%} of the best ORT one ({best_ort.label}) -> "
              f"{verdict(rel >= GOAL_DEFAULT_VS_BEST)}; edgeopt defaults slower than FP32: "
              f"{', '.join(slower) or 'none'} -> {verdict(not slower)}")
    if "resnet18" in args.models:
        best = max(recipes, key=lambda row: speedup["resnet18", row.label])
        got = speedup["resnet18", best.label]
        print(f"\ngoal: ResNet-18 INT8 >= {GOAL_SPEEDUP}x faster than FP32 on the best runtime (the limit on "
              f"AVX512-VNNI is about 4x): measured {got:.2f}x with {best.label} -> {verdict(got >= GOAL_SPEEDUP)}")
    warning = int8_warning(fp)
    if warning:
        print(f"\nwhy: {warning}.")
        print("  Without VNNI an 8-bit multiply-accumulate takes three instructions (vpmaddubsw, vpmaddwd, vpaddd)")
        print("  where VNNI takes one (vpdpbusd), so an INT8 convolution does barely more arithmetic per instruction")
        print("  than an FP32 FMA one; what it gains comes mostly from moving a quarter of the bytes. The goal needs")
        print("  AVX512-VNNI, AVX-VNNI or AMX (x86) or dot-product instructions (ARM).")
    print(load_line("at the end"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
