"""The edgeopt latency harness against OpenVINO's own benchmark_app, on the same IR.

Both run the same OpenVINO IR (default: ResNet-18 FP32, torchvision random init, exported with
edgeopt.models.export like the pipeline's IRs: dynamic batch, FP32 weights) on CPU with one stream, the
same thread count, f32 inference precision, batch 1 and the same input tensor:

  harness:        edgeopt.runtimes.OpenVINOPredictor(threads=N) timed by edgeopt.measure.latency.measure
  benchmark_app:  -d CPU -hint none -nstreams 1 -nthreads N -api sync -infer_precision f32 -ip f32
                  -i <the same input .npy> -data_shape [1,3,224,224] -inference_only true -niter <iterations>

(-nstreams and -nthreads need -hint none; -api sync is the latency mode, one request at a time;
-ip f32 keeps benchmark_app from turning the image-like input into u8 with a conversion layer.)
(-data_shape only for an IR with a dynamic batch.) The two alternate over --repetitions (ABBA
order, so a drift of the machine hits both alike), the compiled-model settings each really used are
printed side by side, and the script prints the ratio of the p50s (goal: within 10 %) and the
run-to-run spread of each (goal: under 5 %). benchmark_app reports OpenVINO's own request.latency;
the harness times the whole Python call, so the harness's request.latency is printed too: the
difference is the harness's own cost, the rest is the machine.

    .venv/bin/python bench/harness_vs_benchmark_app.py             # 6 repetitions x 200 iterations
    .venv/bin/python bench/harness_vs_benchmark_app.py --quick
    .venv/bin/python bench/harness_vs_benchmark_app.py --model path/to/model.xml
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from _common import argument_parser, fingerprint_line, load_line, median, quiet, silenced, span, spread, verdict

GOAL_RATIO = 0.10  # |harness p50 / benchmark_app p50 - 1|
GOAL_SPREAD = 0.05  # (max - min) / median over the repetitions
INPUT_SHAPE = (3, 224, 224)
SETTINGS = ("NUM_STREAMS", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT",
            "EXECUTION_MODE_HINT", "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING", "SCHEDULING_CORE_TYPE")


def parse_args(argv=None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--model", type=Path, default=None,
                   help="an OpenVINO IR .xml (default: ResNet-18 FP32 IR, random init)")
    p.add_argument("--threads", type=int, default=1, help="inference threads for both (default 1)")
    p.add_argument("--iterations", type=int, default=200, help="timed inferences per measurement")
    p.add_argument("--warmup", type=int, default=20, help="harness warm-up inferences after the first one")
    p.add_argument("--rounds", type=int, default=5, help="harness rounds per measurement")
    p.add_argument("--repetitions", type=int, default=6, help="measurements of each tool, alternating")
    p.add_argument("--benchmark-app", type=Path, default=None,
                   help="benchmark_app executable (default: the one beside this Python, else on PATH)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke check: 2 repetitions x 30 iterations")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.warmup, args.rounds, args.repetitions = 30, 5, 2, 2
    return args


def find_benchmark_app(given: Path | None) -> Path:
    if given is not None:
        return given
    beside = Path(sys.executable).parent / "benchmark_app"
    found = beside if beside.exists() else shutil.which("benchmark_app")
    if not found:
        raise SystemExit("benchmark_app not found: install openvino in this environment or pass --benchmark-app")
    return Path(found)


def resnet18_ir(folder: Path, seed: int) -> Path:
    import torch
    import torchvision

    from edgeopt.models.export import export_onnx, onnx_to_openvino

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    return onnx_to_openvino(export_onnx(model, INPUT_SHAPE, folder / "resnet18.onnx"), folder / "resnet18.xml")


class Recorder:
    """The harness's predictor, also keeping each call's ``request.latency``: the time OpenVINO itself
    measured inside ``infer``, which is what benchmark_app reports. The harness's own figure adds the
    Python side of a call (filling the input tensor, copying the logits out)."""

    def __init__(self, predictor):
        self.predictor, self.inside_ms = predictor, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.predictor(x)
        self.inside_ms.append(self.predictor.request.latency)
        return out


def run_benchmark_app(cmd: List[str]) -> Tuple[float, Dict[str, str], str]:
    """(median latency ms, compiled-model settings, input precision) from one benchmark_app run."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    text = out.stdout + out.stderr
    m = re.search(r"Median:\s+([0-9.]+)\s*ms", text)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"benchmark_app failed (exit {out.returncode}):\n{' '.join(cmd)}\n{text[-3000:]}")
    step8 = text.split("[Step 8/11]", 1)[1].split("[Step 9/11]", 1)[0]
    settings = dict(re.findall(r"\[ INFO \]\s+([A-Z_]+): (.*)", step8))
    step6 = text.split("[Step 6/11]", 1)[1].split("[Step 7/11]", 1)[0]
    precision = re.search(r"Model inputs:\s*\n\[ INFO \]\s+\S+ \(node: [^)]*\) : (\w+)", step6)
    return float(m.group(1)), settings, precision.group(1) if precision else "?"


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    import openvino as ov

    from edgeopt.measure.latency import cpu_fingerprint, measure
    from edgeopt.runtimes import OpenVINOPredictor

    bapp = find_benchmark_app(args.benchmark_app)
    fp = cpu_fingerprint()
    print(fingerprint_line(fp))
    print(load_line("at the start"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model is None:
            print("exporting ResNet-18 (random init) to an FP32 IR ...", flush=True)
            with silenced():
                xml = resnet18_ir(tmp, args.seed)
        else:
            xml = args.model
        ir_input = ov.Core().read_model(str(xml)).input(0)
        shape = ir_input.get_partial_shape()
        if not all(d.is_static for d in shape[1:]):
            raise SystemExit(f"{xml}: input {shape} has dynamic dimensions besides the batch")
        x_shape = (1, *(d.get_length() for d in shape[1:]))
        x = np.random.default_rng(args.seed).standard_normal(x_shape, dtype=np.float32)
        npy = tmp / "input.npy"
        np.save(npy, x)
        cmd = [str(bapp), "-m", str(xml), "-d", "CPU", "-hint", "none", "-nstreams", "1",
               "-nthreads", str(args.threads), "-api", "sync", "-infer_precision", "f32", "-ip", "f32",
               "-i", f"{ir_input.any_name}:{npy}", "-inference_only", "true", "-niter", str(args.iterations)]
        if shape.is_dynamic:
            cmd += ["-data_shape", str(list(x_shape)).replace(" ", "")]
        print(f"model {xml.name}, input {list(x_shape)}; threads {args.threads}, one stream, f32; "
              f"{args.iterations} iterations x {args.repetitions} repetitions, alternating "
              f"(harness: +{args.warmup} warm-up, {args.rounds} rounds)")
        print("benchmark_app command:", " ".join(cmd).replace(str(tmp), "$TMP"))

        harness = Recorder(OpenVINOPredictor(xml, args.threads))
        ours = {k: str(harness.predictor.compiled.get_property(k)) for k in SETTINGS}
        results: Dict[str, List[float]] = {"harness": [], "benchmark_app": [], "inside": []}
        theirs, input_precision = {}, "?"
        for r in range(args.repetitions):
            order = ("harness", "benchmark_app") if r % 2 == 0 else ("benchmark_app", "harness")
            for tool in order:
                if tool == "harness":
                    lat = measure({"harness": harness}, x, warmup=args.warmup, iterations=args.iterations,
                                  rounds=args.rounds)["harness"]
                    results["harness"].append(lat.p50_ms)
                    results["inside"].append(float(np.median(harness.inside_ms[-lat.iterations:])))
                else:
                    p50, theirs, input_precision = run_benchmark_app(cmd)
                    results["benchmark_app"].append(p50)
            print(f"  repetition {r + 1}/{args.repetitions}: harness {results['harness'][-1]:.2f} ms "
                  f"({results['inside'][-1]:.2f} inside OpenVINO), benchmark_app {results['benchmark_app'][-1]:.2f} ms",
                  flush=True)

    print("\ncompiled-model settings     harness                       benchmark_app")
    for k in SETTINGS:
        mark = "" if ours[k] == theirs.get(k) else "   <- differs"
        print(f"  {k:<26}{ours[k]:<30}{theirs.get(k, '?')}{mark}")
    print(f"  {'input precision':<26}{'f32':<30}{input_precision}{'' if input_precision == 'f32' else '   <- differs'}")

    h, b, inside = results["harness"], results["benchmark_app"], results["inside"]
    ratios = [a / c for a, c in zip(h, b)]
    ratio = median(ratios)
    print(f"\np50 ms (median [min-max] over {args.repetitions} repetitions): harness {span(h)}, "
          f"benchmark_app {span(b)}")
    print(f"  the harness's calls timed inside OpenVINO (request.latency, as benchmark_app times them): "
          f"{span(inside)}; the Python side of a harness call: {span([a - c for a, c in zip(h, inside)], '{:.3f}')}")
    inside_ratios = [a / c for a, c in zip(inside, b)]
    print(f"  inside OpenVINO, harness / benchmark_app per repetition: {span(inside_ratios, '{:.3f}')}")
    print(f"harness / benchmark_app p50, per repetition: {span(ratios, '{:.3f}')} -> off by {abs(ratio - 1):.1%}; "
          f"goal within {GOAL_RATIO:.0%}: {verdict(abs(ratio - 1) <= GOAL_RATIO)}")
    for name, values in (("harness", h), ("benchmark_app", b)):
        s = spread(values)
        print(f"run-to-run spread of {name} ((max-min)/median): {s:.1%}; goal under {GOAL_SPREAD:.0%}: "
              f"{verdict(s < GOAL_SPREAD)}")
    print(load_line("at the end"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
