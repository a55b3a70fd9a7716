"""The pipeline's promoted model against the simplest alternative a user has: NNCF PTQ of the teacher.

1. Runs the compress pipeline (pipelines.runner.run_pipeline) on a config (default: the embedded
   default, configs/default.yaml) with ZenML's store, the MLflow store, the registry and the deploy
   folder in a temporary folder, so the user's .edgeopt state and deploy/ are not touched.
2. Takes the promoted model from the registry (the champion alias) and the teacher checkpoint the
   run trained (its train_teacher step output).
3. Baseline: the same teacher checkpoint exported to OpenVINO IR (edgeopt.models.export) and quantized
   with NNCF post-training INT8 (edgeopt.precisions.quantize_model, precision int8, with the
   config's variants.quant settings): no distillation, no pruning.
4. Evaluates both, with the teacher's FP32 ONNX on ONNX Runtime as the reference, with the pipeline's
   own harness (edgeopt.measure.evaluate.evaluate_variants: accuracy on the same test split through the
   real runtime, latency interleaved in one process at the target's threads and batch), --repeats
   times, and prints accuracy, p50, size and the ratios.

Goal: ours at least as accurate as the NNCF-quantized teacher, and both faster and smaller.

    .venv/bin/python bench/vs_nncf_teacher.py             # configs/default.yaml, 3 repeats
    .venv/bin/python bench/vs_nncf_teacher.py --quick     # few epochs, few iterations
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from _common import (
    ROOT,
    argument_parser,
    fingerprint_line,
    load_line,
    median,
    pipeline_config,
    run_isolated,
    silenced,
    span,
    verdict,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("-c", "--config", type=Path, default=ROOT / "configs" / "default.yaml", help="run config (YAML)")
    p.add_argument("--repeats", type=int, default=3, help="evaluations of the two models (latency spread)")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary ZenML/MLflow/deploy folder")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 2/3 teacher/student epochs, 1 fine-tune epoch, 20 iterations, no accuracy "
                        "constraint, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return args


def quick_overrides(raw: dict) -> dict:
    v, t = raw.get("variants", {}), raw.get("target", {})
    return {
        **raw,
        "teacher": {**raw["teacher"], "epochs": 2},
        "student": {**raw["student"], "epochs": 3},
        "variants": {**v, "shrink": {k: {**o, "finetune_epochs": 1} for k, o in v.get("shrink", {}).items()}},
        "target": {**t, "iterations": 20, "warmup": 3,
                   "constraints": {**t.get("constraints", {}), "max_accuracy_drop": None}},
    }


def main(argv=None) -> int:
    return run_isolated(parse_args(argv), "edgeopt-bench-nncf-", compare)


def compare(args: argparse.Namespace, state: Path) -> int:
    import yaml

    from edgeopt.measure.evaluate import evaluate_variants, variant_name
    from edgeopt.measure.latency import cpu_fingerprint
    from edgeopt.models.export import export_checkpoint
    from edgeopt.precisions import quantize_model
    from edgeopt.registry.versions import fetch_champion
    from edgeopt_zenml.pipelines.runner import output, run_pipeline

    raw = yaml.safe_load(args.config.read_text())
    cfg = pipeline_config(quick_overrides(raw) if args.quick else raw, state, "vs-nncf", str(args.config))
    print(fingerprint_line(cpu_fingerprint()))
    print(load_line("at the start"))
    print(f"running the compress pipeline on {args.config.name}{' (quick)' if args.quick else ''}, "
          f"state in {state} ...", flush=True)
    t0 = time.perf_counter()
    with silenced():
        summary = run_pipeline(cfg, run_name=f"bench-vs-nncf-{time.strftime('%Y%m%d-%H%M%S')}")
    promotion, run = summary["promotion"], summary["run"]
    print(f"  pipeline done in {time.perf_counter() - t0:.0f} s; {summary['headline'].splitlines()[0]}")
    if not promotion.promoted:
        print(f"nothing was promoted ({promotion.reason}): no model of ours to compare")
        return 1

    dataset = output(run, "load_data", "dataset")
    teacher = output(run, "train_teacher", "teacher")
    teacher_onnx = output(run, "export_teacher_onnx", "model")
    champion = fetch_champion(cfg.tracking_uri(), cfg.registry.name, cfg.registry.alias, state / "champion")
    assert champion is not None  # promoted above
    ours, version, ours_runtime = champion
    print("baseline: the same teacher checkpoint -> OpenVINO IR -> NNCF INT8 PTQ ...", flush=True)
    with silenced():
        fp32 = export_checkpoint(teacher, "openvino", dataset, "nncf-teacher-fp32-openvino")
        baseline = quantize_model(fp32, "int8", dataset, cfg.variants.quant, cfg.seed, "nncf-teacher-int8-openvino")
    if baseline.failed:
        raise SystemExit(f"the NNCF baseline failed to build: {baseline.manifest['reason']}")
    names = {"ours": variant_name(ours, ours_runtime), "nncf": variant_name(baseline, "openvino")}
    reference = variant_name(teacher_onnx, "onnxruntime")
    evaluations = {ours.variant: [ours_runtime], baseline.variant: ["openvino"], teacher_onnx.variant: ["onnxruntime"]}

    metrics = {k: [] for k in names}
    teacher_acc = None
    for r in range(args.repeats):
        print(f"evaluating both with the pipeline's harness, repeat {r + 1}/{args.repeats} ...", flush=True)
        with silenced():
            ev = evaluate_variants([ours, baseline, teacher_onnx], evaluations, dataset, reference, cfg.target)
        for k, name in names.items():
            res = ev.result(name)
            if not res.ok:
                raise SystemExit(f"{name} failed to evaluate: {res.reason}")
            metrics[k].append(res.metrics)
        teacher_acc = ev.reference.accuracy

    n_test = dataset.manifest["sizes"]["test"]
    t = cfg.target
    print(f"\ntest split: {n_test} images (one image = {100 / n_test:.2f} pt); target {t.name}: {t.threads} thread(s), "
          f"batch {t.batch}, {t.iterations} iterations; p50 is median [min-max] over {args.repeats} evaluation(s)")
    print(f"{'':<18}{'model':<40}{'accuracy %':>11}{'p50 ms':>26}{'size kB':>10}")
    label = {"ours": f"ours (v{version})", "nncf": "NNCF PTQ teacher"}
    for k, name in names.items():
        m = metrics[k]
        print(f"{label[k]:<18}{name:<40}{100 * m[0]['accuracy']:>11.2f}"
              f"{span([x['latency_p50_ms'] for x in m], '{:.4f}'):>26}{1e3 * m[0]['size_mb']:>10.1f}")
    print(f"{'teacher FP32':<18}{reference:<40}{100 * teacher_acc:>11.2f}")

    acc_diff = 100 * (metrics["ours"][0]["accuracy"] - metrics["nncf"][0]["accuracy"])
    speedups = [n["latency_p50_ms"] / o["latency_p50_ms"] for o, n in zip(metrics["ours"], metrics["nncf"])]
    smaller = metrics["nncf"][0]["size_mb"] / metrics["ours"][0]["size_mb"]
    print(f"\nours vs NNCF PTQ teacher: accuracy {acc_diff:+.2f} pt; p50 {span(speedups)}x lower; "
          f"file {smaller:.1f}x smaller")
    base = metrics["nncf"][0]["accuracy"]
    stderr = 100 * math.sqrt(base * (1 - base) / n_test)  # binomial standard error of one accuracy on this split
    print(f"goal: at least as accurate: {verdict(acc_diff >= 0)} ({acc_diff:+.2f} pt = {acc_diff * n_test / 100:+.0f} "
          f"test images; one standard error of an accuracy on this split: {stderr:.2f} pt); "
          f"faster: {verdict(median(speedups) > 1)}; smaller: {verdict(smaller > 1)}")
    print(load_line("at the end"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
