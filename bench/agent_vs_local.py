"""The edge agent against local evaluation: same machine, same models, same protocol.

A model (default: edgeopt's resnet_small, width 32, on digits upsampled to 32x32; two training
steps, since latency does not depend on the weights' values) is exported to ONNX and OpenVINO IR and
quantized to INT8 with the pipeline's own functions, giving four (model, runtime) pairs:
FP32 ONNX on ONNX Runtime (the reference) and on OpenVINO, FP32 IR on OpenVINO, INT8 ONNX on ONNX
Runtime. They are measured

  local:  edgeopt.measure.evaluate.evaluate_variants, in this process (what `evaluate` runs without targets);
  agent:  edgeopt.agent.targets.evaluate_on_device, through an agent started on 127.0.0.1
          (python -m edgeopt.agent, from --agent-python: e.g. a venv with only
          infra/agent/requirements.txt), which runs the same protocol in a job process of its own,

alternating in ABBA order over --repetitions (a drift of the machine hits both alike). For each
pair, the ratio agent p50 / local p50 is taken within each ABBA block and the median reported
(goal: within 5 %: the protocol is the same and the network is outside the timed region). As a
control, the machine's own noise: local against the local measurement right after it (the two
locals at each ABBA block boundary). The top-1 predictions must agree (same accuracy), and the
agent's job time and peak memory are printed.

    .venv/bin/python bench/agent_vs_local.py                                  # 4 repetitions x 200 iterations
    .venv/bin/python bench/agent_vs_local.py --agent-python ../agent-venv/bin/python
    .venv/bin/python bench/agent_vs_local.py --quick
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

from _common import ROOT, argument_parser, fingerprint_line, load_line, median, run_isolated, silenced, span, verdict

GOAL_RATIO = 0.05  # |agent p50 / local p50 - 1|
TOKEN = "bench-agent-token-0123456789"
REFERENCE = "teacher-fp32-onnx@onnxruntime"


def parse_args(argv=None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--arch", default="resnet_small", help="edgeopt architecture (default resnet_small)")
    p.add_argument("--width", type=int, default=32, help="its base width (default 32)")
    p.add_argument("--image-size", type=int, default=32, help="digits upsampled to this many pixels a side")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iterations", type=int, default=200, help="timed inferences per model and measurement")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repetitions", type=int, default=4, help="measurements of each side, ABBA order (even)")
    p.add_argument("--agent-python", type=Path, default=Path(sys.executable),
                   help="the Python that runs the agent (default: this one)")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 repetitions x 40 iterations")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state folder")
    args = p.parse_args(argv)
    if args.quick:
        args.repetitions, args.iterations, args.warmup = 2, 40, 5
    if args.repetitions % 2:
        p.error("--repetitions must be even (ABBA order)")
    return args


def build(args, state: Path):
    from edgeopt.config import DataConfig, QuantConfig, TeacherConfig
    from edgeopt.data.sources import load_dataset
    from edgeopt.models.export import export_checkpoint
    from edgeopt.precisions import quantize_model
    from edgeopt.train.teacher import train_teacher

    ds = load_dataset(DataConfig(source="digits", image_size=(args.image_size, args.image_size)), seed=0,
                      cache_dir=state / "cache")
    ckpt = train_teacher(ds, TeacherConfig(arch=args.arch, width=args.width, steps=2, batch_size=32), seed=0)
    onnx = export_checkpoint(ckpt, "onnx", ds, "teacher-fp32-onnx")
    models = [onnx, export_checkpoint(ckpt, "openvino", ds, "teacher-fp32-openvino"),
              quantize_model(onnx, "int8", ds, QuantConfig(calibration_samples=64), 0, "teacher-int8-onnx")]
    evaluations = {"teacher-fp32-onnx": ["onnxruntime", "openvino"], "teacher-fp32-openvino": ["openvino"],
                   "teacher-int8-onnx": ["onnxruntime"]}
    return ds, models, evaluations


def start_agent(python: Path, state: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(state / "agent.log", "w")
    proc = subprocess.Popen([str(python), "-m", "edgeopt.agent", "--port", str(port)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "EDGEOPT_AGENT_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    raise SystemExit(f"the agent did not start; its log: {state / 'agent.log'}")


def compare(args, state: Path) -> int:
    from edgeopt.agent.targets import evaluate_on_device
    from edgeopt.config import DeviceTargetConfig, TargetConfig
    from edgeopt.measure.evaluate import evaluate_variants
    from edgeopt.measure.latency import cpu_fingerprint

    print(fingerprint_line(cpu_fingerprint()))
    print(load_line("before"))
    with silenced():
        ds, models, evaluations = build(args, state)
    proc, url = start_agent(args.agent_python, state)
    os.environ["BENCH_AGENT_TOKEN"] = TOKEN
    device = DeviceTargetConfig(label="agent", url=url, token_env="BENCH_AGENT_TOKEN")
    target = TargetConfig(threads=args.threads, warmup=args.warmup, iterations=args.iterations)
    print(f"agent {url} from {args.agent_python}; {args.threads} thread(s), batch 1, {args.iterations} iterations "
          f"after {args.warmup} warm-up, {args.repetitions} repetitions of each side (ABBA)")
    p50: Dict[str, Dict[str, List[float]]] = {"local": {}, "agent": {}}
    acc: Dict[str, Dict[str, float]] = {"local": {}, "agent": {}}
    jobs: List[str] = []
    try:
        for i in range(args.repetitions):
            for side in (("local", "agent") if i % 2 == 0 else ("agent", "local")):
                with silenced():
                    if side == "local":
                        ev = evaluate_variants(models, evaluations, ds, REFERENCE, target)
                    else:
                        ev = evaluate_on_device(models, evaluations, ds, REFERENCE, target, device)
                if ev.error:
                    raise SystemExit(f"agent: {ev.error}")
                if side == "agent":
                    jobs.append(f"{ev.device['job_s']:.1f} s, peak {ev.device['peak_rss_mb']:.0f} MB")
                for r in ev.results:
                    assert r.ok, f"{side} {r.variant}: {r.reason}"
                    p50[side].setdefault(r.variant, []).append(r.metrics["latency_p50_ms"])
                    acc[side][r.variant] = r.metrics["accuracy"]
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"agent jobs: {'; '.join(jobs)}")
    print()
    print(f"{'model@runtime':34} {'local p50 ms':>22} {'agent p50 ms':>22} {'agent/local':>12} {'local/local':>12}  "
          "accuracy")
    worst, floor = 0.0, 0.0
    for name in p50["local"]:
        loc, ag = p50["local"][name], p50["agent"][name]
        # ratio within each ABBA block (the two sides measured back to back), median over the blocks
        ratio = median([median(ag[i:i + 2]) / median(loc[i:i + 2]) for i in range(0, len(loc), 2)])
        # the machine's own noise: local against the local measurement right after it (A B | B A: the two
        # locals at a block boundary are back to back), median over the boundaries
        control = median([loc[i + 1] / loc[i] for i in range(1, len(loc) - 1, 2)]) if len(loc) > 2 else 1.0
        worst, floor = max(worst, abs(ratio - 1)), max(floor, abs(control - 1))
        same = "same" if acc["local"][name] == acc["agent"][name] else f"DIFFERS {acc['local'][name]:.4f} vs " \
                                                                      f"{acc['agent'][name]:.4f}"
        print(f"{name:34} {span(loc, '{:.4f}'):>22} {span(ag, '{:.4f}'):>22} {ratio:12.3f} {control:12.3f}  {same}")
    ok = worst <= GOAL_RATIO and all(acc["local"][n] == acc["agent"][n] for n in acc["local"])
    print()
    print(f"largest |agent/local - 1|: {100 * worst:.1f} % (goal <= {100 * GOAL_RATIO:.0f} %); the machine's own "
          f"noise, largest |local/local - 1| between back-to-back local measurements: {100 * floor:.1f} %")
    print(f"same predictions: "
          f"{all(acc['local'][n] == acc['agent'][n] for n in acc['local'])} -> {verdict(ok)}")
    print(load_line("after"))
    return 0 if ok else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_isolated(args, "edgeopt-bench-agent-", compare)


if __name__ == "__main__":
    sys.exit(main())
