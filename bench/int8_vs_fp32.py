"""INT8 vs FP32 latency of ResNet-18 and MobileNetV2 on the same runtime, measured in one run.

Each model (torchvision, random init: latency does not depend on the weights' values; BatchNorm
statistics are set from the calibration images so activations have a trained network's scale) is
exported to ONNX with edgeopt.export, then quantized with edgeopt.quantization:
  - ONNX Runtime: FP32 ONNX vs static QDQ INT8 ONNX, per-channel, MinMax; S8S8 (int8 activations,
    edgeopt's default) and, for comparison, U8S8 (uint8 activations; --ort-activations),
  - OpenVINO: FP32 IR vs NNCF INT8 IR (preset performance),
all calibrated on the same random-normal images. Every predictor is timed with
edgeopt.benchmark.measure in one process, on the same input, with the same thread count,
interleaved; the whole measurement is repeated (--repeats) and every ratio is taken within one
repetition.

    .venv/bin/python bench/int8_vs_fp32.py            # full: 200 iterations x 3 repetitions
    .venv/bin/python bench/int8_vs_fp32.py --quick    # smoke check (about a minute)

Goal: ResNet-18 INT8 >= 3.5x faster than FP32 on the best runtime (about 4x is the limit on a CPU
with AVX512-VNNI). On a CPU without VNNI the script says so and shows why the figure is lower.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from _common import argument_parser, fingerprint_line, load_line, median, quiet, silenced, span, verdict

GOAL_SPEEDUP = 3.5
MODELS = ("resnet18", "mobilenet_v2")
INPUT_SHAPE = (3, 224, 224)


@dataclass(frozen=True)
class Row:
    """One INT8 recipe on one runtime, compared with the FP32 model on that runtime."""

    label: str
    runtime: str
    ort_activation: str | None = None  # onnxruntime only: int8 (S8S8) or uint8 (U8S8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="torchvision models to measure")
    p.add_argument("--threads", type=int, default=1, help="inference threads of every runtime (default 1)")
    p.add_argument("--ort-activations", nargs="+", choices=("int8", "uint8"), default=["int8", "uint8"],
                   help="ONNX Runtime activation types to quantize with: int8 = S8S8 (edgeopt's default), "
                        "uint8 = U8S8 (default: both)")
    p.add_argument("--calibration", type=int, default=32, help="random-normal calibration images (default 32)")
    p.add_argument("--iterations", type=int, default=200, help="timed inferences per model per repetition")
    p.add_argument("--warmup", type=int, default=20, help="untimed inferences after the first one")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per repetition")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of the whole interleaved measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep the exported models here (default: a temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 20 iterations, 1 repetition, 8 calibration images")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.warmup, args.rounds, args.repeats, args.calibration = 20, 3, 2, 1, 8
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


def build_models(name: str, rows: List[Row], folder: Path, calibration: np.ndarray, seed: int) -> Dict[str, Path]:
    """Model files of one torchvision model: "fp32:<runtime>" and "int8:<row label>"."""
    import torch
    import torchvision

    from edgeopt.config import OrtQuantConfig
    from edgeopt.export import export_onnx, onnx_to_openvino
    from edgeopt.quantization import quantize_onnx_int8, quantize_openvino_int8

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    set_batchnorm_statistics(model, calibration)
    onnx_fp32 = export_onnx(model, INPUT_SHAPE, folder / f"{name}.fp32.onnx")
    ir_fp32 = onnx_to_openvino(onnx_fp32, folder / f"{name}.fp32.xml", compress_to_fp16=False)
    files = {"fp32:onnxruntime": onnx_fp32, "fp32:openvino": ir_fp32}
    for row in rows:
        if row.runtime == "onnxruntime":
            dst = folder / f"{name}.int8-{row.ort_activation}.onnx"
            files[f"int8:{row.label}"] = quantize_onnx_int8(
                onnx_fp32, dst, calibration, OrtQuantConfig(activation_type=row.ort_activation))
        else:
            files[f"int8:{row.label}"] = quantize_openvino_int8(ir_fp32, folder / f"{name}.int8.xml", calibration)
    return files


def model_bytes(path: Path) -> int:
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def ort_int8_convs(path: Path, threads: int) -> Tuple[int, int]:
    """(fused, total): convolutions ONNX Runtime really runs in INT8 after its graph optimizations."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return ops["QLinearConv"], ops["QLinearConv"] + ops["Conv"]


def ov_int8_layers(predictor) -> Tuple[int, int]:
    """(int8, total): convolution / fully-connected layers OpenVINO executes in u8/i8."""
    layers = Counter()
    for op in predictor.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Convolution", "FullyConnected"):
            layers[info["runtimePrecision"].astype(str) in ("u8", "i8")] += 1
    return layers[True], layers[True] + layers[False]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    from edgeopt.benchmark import cpu_fingerprint, int8_warning, measure
    from edgeopt.runtimes import OpenVINOPredictor, OrtPredictor

    rows = [Row(f"onnxruntime {'S8S8' if a == 'int8' else 'U8S8'}", "onnxruntime", a) for a in args.ort_activations]
    rows.append(Row("openvino NNCF", "openvino"))
    make = {"onnxruntime": OrtPredictor, "openvino": OpenVINOPredictor}
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

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        predictors, notes = {}, {}
        for name in args.models:
            print(f"exporting and quantizing {name} ...", flush=True)
            with silenced():
                files = build_models(name, rows, folder, calibration, args.seed)
            for rt in make:
                predictors[name, f"fp32:{rt}"] = make[rt](files[f"fp32:{rt}"], args.threads)
            for row in rows:
                fp32, key = predictors[name, f"fp32:{row.runtime}"], f"int8:{row.label}"
                int8 = predictors[name, key] = make[row.runtime](files[key], args.threads)
                ort = row.runtime == "onnxruntime"
                sizes = [model_bytes(files[f"fp32:{row.runtime}"]) / 1e6, model_bytes(files[key]) / 1e6]
                notes[name, row] = {
                    "size": f"{sizes[0]:.1f} -> {sizes[1]:.1f} MB",
                    "cos": cosine(fp32.predict_batched(x_check), int8.predict_batched(x_check)),
                    "graph": ort_int8_convs(files[key], args.threads) if ort else ov_int8_layers(int8),
                    "what": "Conv fused to QLinearConv" if ort else "Conv/FC run in u8/i8",
                }

        p50: Dict[tuple, List[float]] = {k: [] for k in predictors}
        for r in range(args.repeats):
            print(f"measuring, repetition {r + 1}/{args.repeats} ...", flush=True)
            lat = measure({"/".join(k): p for k, p in predictors.items()}, x, warmup=args.warmup,
                          iterations=args.iterations, rounds=args.rounds)
            for k in predictors:
                p50[k].append(lat["/".join(k)].p50_ms)

    print()
    print(f"{'model':<13} {'INT8 recipe':<17} {'FP32 p50 ms':>20} {'INT8 p50 ms':>20} {'INT8/FP32 speedup':>20}  "
          f"{'size':>16}  {'logit cos':>9}  INT8 in the executed graph")
    speedups: Dict[tuple, List[float]] = {}
    for name in args.models:
        for row in rows:
            f, i = p50[name, f"fp32:{row.runtime}"], p50[name, f"int8:{row.label}"]
            speedups[name, row] = [a / b for a, b in zip(f, i)]
            n = notes[name, row]
            print(f"{name:<13} {row.label:<17} {span(f):>20} {span(i):>20} {span(speedups[name, row]) + 'x':>20}  "
                  f"{n['size']:>16}  {n['cos']:>9.4f}  {n['graph'][0]}/{n['graph'][1]} {n['what']}")
    print("(median [min-max] over the repetitions; each speedup is FP32 p50 / INT8 p50 of the same repetition, "
          "on the same runtime; logit cos: INT8 vs FP32 logits on 8 other random images)")
    print()
    best: Dict[str, Row] = {}
    for name in args.models:
        best[name] = max(rows, key=lambda row: median(speedups[name, row]))
        fastest = min(rows, key=lambda row: median(p50[name, f"int8:{row.label}"]))
        print(f"{name}: best INT8/FP32 speedup {median(speedups[name, best[name]]):.2f}x with {best[name].label}; "
              f"fastest INT8 model: {fastest.label} ({median(p50[name, f'int8:{fastest.label}']):.2f} ms p50)")

    if "resnet18" in args.models:
        got = median(speedups["resnet18", best["resnet18"]])
        print(f"\ngoal: ResNet-18 INT8 >= {GOAL_SPEEDUP}x faster than FP32 on the best runtime (the limit on "
              f"AVX512-VNNI is about 4x): measured {got:.2f}x with {best['resnet18'].label} -> "
              f"{verdict(got >= GOAL_SPEEDUP)}")
    warning = int8_warning(fp)
    if warning:
        print(f"\nwhy (1): {warning}.")
        print("  Without VNNI an 8-bit multiply-accumulate takes three instructions (vpmaddubsw, vpmaddwd, vpaddd)")
        print("  where VNNI takes one (vpdpbusd), so an INT8 convolution does barely more arithmetic per instruction")
        print("  than an FP32 FMA one; what it gains comes mostly from moving a quarter of the bytes. The goal needs")
        print("  AVX512-VNNI, AVX-VNNI or AMX (x86) or dot-product instructions (ARM).")
    partial = [f"{name} {row.label} {fused}/{total}" for name in args.models for row in rows
               if row.runtime == "onnxruntime" for fused, total in [notes[name, row]["graph"]] if fused < total]
    if partial:
        print(f"\nwhy (2): ONNX Runtime left convolutions in FP32 ({'; '.join(partial)} fused to QLinearConv).")
        print("  On x86-64 its CPU provider fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv only")
        print("  with uint8 activations; it rewrites int8 (S8) activations to uint8 only where the quantized tensor")
        print("  has a single consumer, so convolutions next to a fan-out (residual branches) run in FP32 between")
        print("  Q/DQ pairs and pay the conversions on top.")
        if "uint8" in args.ort_activations:
            print("  The U8S8 rows show the same models quantized with uint8 activations.")
    print(load_line("at the end"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
