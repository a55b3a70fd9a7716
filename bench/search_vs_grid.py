"""Search vs grid (issue 21): the same model, technique, fine-tune, precisions and runtimes, compressed once
by a dense grid of prune amounts and once by edgeopt's search (variants.search), on this machine.

- grid: every amount of the range (0.4-0.9 on digits, 0.1-0.6 on the brought model) at the search's own step
  of 0.05 (11 amounts: the exhaustive answer on the lattice the search samples, what a user without a search
  would have to build to be sure of the best; ``--grid-step 0.1`` builds 6), each with the technique's full
  KD fine-tune, x fp32/int8 x ONNX x ONNX Runtime/OpenVINO, as the pipeline builds a grid;
- search: an Optuna study over the same range at a step of 0.05 (not started from the grid), every trial
  measured on this CPU before any fine-tune, short fine-tunes with successive halving for the rest, the
  full fine-tune and INT8 for its survivors only;
- both include the unpruned model's variants (built once, its time counted in both); each side's wall time
  (and this process's CPU time, which other jobs on a shared machine move much less) is its builds plus
  its own evaluation; the fronts are compared in ONE evaluation loop of every variant of
  both sides (same process, same input, interleaved), selected as the pipeline selects (validation accuracy,
  max accuracy drop, objective latency).

Hypervolume: of the feasible front in (accuracy drop, p50 / reference p50, size / reference size), all
minimized, against the point (max accuracy drop, 1, 1): the reference model's latency and size.

    .venv/bin/python bench/search_vs_grid.py --quick    # digits, the default teacher trained here (~10 min)
    .venv/bin/python bench/search_vs_grid.py            # the brought-model bench model (bench/brought_model.py's
                                                        # Lite1 assets, built if missing; 1 h 35 min on two
                                                        # cores; --model lite0: the Lite0 one, over 1 hour)

Goal: the search's best feasible variant within 5 % of the grid's best p50 at no larger accuracy drop; its
front's hypervolume >= 95 % of the grid's; in <= 40 % of the grid's wall time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Tuple

from _common import argument_parser, fingerprint_line, load_line, run_isolated, verdict

GOAL = {"p50": 1.05, "hypervolume": 0.95, "wall": 0.40}
SEARCH_STEP = 0.05
RANGES = {"quick": (0.4, 0.9), "brought": (0.1, 0.6)}  # digits' teacher keeps its accuracy far longer under
# pruning than the brought EfficientNets do
QUICK = {  # the default config's teacher on digits, pruned and fine-tuned as long as a real model would be
    "name": "search-bench-digits", "seed": 0,
    "data": {"source": "digits"},
    "teacher": {"arch": "resnet_small", "width": 32, "epochs": 15, "batch_size": 64, "lr": 0.05},
    "variants": {"bases": ["teacher"], "quant": {"calibration_samples": 128},
                 "shrink": {"prune": {"importance": "l2", "round_to": 8, "finetune_epochs": 20, "lr": 0.02}}},
    "target": {"threads": 1, "batch": 1, "warmup": 20, "iterations": 200, "constraints": {"max_accuracy_drop": 1.0}},
}


def parse_args(argv=None):
    p = argument_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="digits and the default config's teacher instead of the brought-model bench model")
    p.add_argument("--model", choices=("lite0", "lite1"), default="lite1",
                   help="the brought-model bench model (bench/brought_model.py): lite1 (default), whose val and test "
                        "come from the same held-out regions; lite0's val, from other regions, moves by 5 pt "
                        "between neighbouring prune amounts (bench/README.md), which no search can rank")
    p.add_argument("--trials", type=int, default=8, help="the search's trial budget (default 8)")
    p.add_argument("--survivors", type=int, default=2, help="the search's survivors (full fine-tunes, default 2)")
    p.add_argument("--grid-step", type=float, default=SEARCH_STEP,
                   help=f"the grid's step between prune amounts (default {SEARCH_STEP}: the search's own lattice)")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary state folder")
    return p.parse_args(argv)


def configs(args, state: Path):
    """(grid config, search config): the same run but for the structural variants."""
    import yaml

    from edgeopt.plan import parse_config

    if args.quick:
        raw = dict(QUICK)
    else:
        import brought_model

        b = brought_model.MODELS[args.model]
        brought_model.build_assets(b)
        raw = yaml.safe_load(b.config.read_text())
        raw["data"]["root"], raw["teacher"]["onnx"] = str(b.photo_root), str(b.onnx_file)
        raw["variants"]["bases"] = ["teacher"]
    technique = {k: v for k, v in raw["variants"]["shrink"]["prune"].items() if k != "amounts"}
    lo, hi = RANGES["quick" if args.quick else "brought"]
    n = round((hi - lo) / args.grid_step)
    common = {**raw["variants"], "formats": ["onnx"], "runtimes": ["onnxruntime", "openvino"],
              "quantization": ["fp32", "int8"]}
    raw = {**raw, "tracking": {"uri": f"sqlite:///{state / 'mlflow.db'}"}, "deploy": {"root": str(state / "deploy")},
           "selection": {"objective": "latency"}}
    grid = parse_config({**raw, "variants": {**common, "shrink": {"prune": {
        **technique, "amounts": [round(lo + k * args.grid_step, 6) for k in range(n + 1)]}}}}, "grid")
    search = parse_config({**raw, "variants": {**common, "shrink": {}, "search": {
        "shrink": {"prune": {**technique, "range": [lo, hi], "step": SEARCH_STEP}}, "budget": {"trials": args.trials},
        "survivors": args.survivors, "start_from_grid": False, "storage": f"sqlite:///{state / 'search.db'}"}}},
        "search")
    return grid, search


def build(cfg, dataset, teacher, checkpoint_for, skip=()) -> Tuple[list, Dict[str, List[str]]]:
    """Every variant of ``cfg``'s plan but those of shrink keys in ``skip``, as the pipeline builds them."""
    from edgeopt.models.export import export_checkpoint
    from edgeopt.plan import variant_plan
    from edgeopt.precisions import quantize_model

    plan = variant_plan(cfg)
    checkpoints = {s.key: checkpoint_for(s) for s in plan.shrinks if s.key not in skip}
    exports: Dict[str, object] = {}
    models = []
    for b in plan.builds:
        if b.shrink.key in skip:
            continue
        if b.export_id not in exports:
            exports[b.export_id] = export_checkpoint(checkpoints[b.shrink.key], b.format, dataset, b.fp32_name)
        fp32 = exports[b.export_id]
        models.append(fp32 if b.precision == "fp32" else quantize_model(fp32, b.precision, dataset, cfg.variants.quant,
                                                                         cfg.seed, b.name))
    return models, {b.name: list(b.runtimes) for b in plan.builds if b.shrink.key not in skip}


def hypervolume(points: List[Tuple[float, float, float]], ref: Tuple[float, float, float]) -> float:
    """Exact hypervolume (all objectives minimized) dominated by ``points`` up to ``ref``, on the grid of
    their coordinates (a few dozen points)."""
    pts = [p for p in points if all(x < r for x, r in zip(p, ref))]
    axes = [sorted({p[i] for p in pts} | {ref[i]}) for i in range(3)]
    vol = 0.0
    for i in range(len(axes[0]) - 1):
        for j in range(len(axes[1]) - 1):
            for k in range(len(axes[2]) - 1):
                corner = (axes[0][i], axes[1][j], axes[2][k])
                if any(all(p[d] <= corner[d] for d in range(3)) for p in pts):
                    vol += ((axes[0][i + 1] - axes[0][i]) * (axes[1][j + 1] - axes[1][j])
                            * (axes[2][k + 1] - axes[2][k]))
    return vol


def side(name: str, metrics: Dict[str, dict], cfg, reference: dict) -> Dict[str, object]:
    from edgeopt.select.pareto import select

    constraints = cfg.target.constraints.model_dump(mode="json")
    sel = select(metrics, constraints, "latency")
    front = sel.front
    max_drop = constraints["max_accuracy_drop"]
    hv = hypervolume([(metrics[v]["accuracy_drop"], metrics[v]["latency_p50_ms"] / reference["latency_p50_ms"],
                       metrics[v]["size_mb"] / reference["size_mb"]) for v in front], (max_drop, 1.0, 1.0))
    return {"name": name, "selection": sel, "front": front, "hv": hv, "winner": sel.winner,
            "best": metrics[sel.winner] if sel.winner else None}


def print_front(s: Dict[str, object], metrics: Dict[str, dict]) -> None:
    print(f"\n{s['name']} front ({len(s['front'])} variants; hypervolume {s['hv']:.4f}; best: {s['winner']}):")  # type: ignore[arg-type]
    print(f"  {'variant':44s} {'acc %':>6s} {'drop':>6s} {'p50 ms':>8s} {'size MB':>8s}")
    for v in sorted(s["front"], key=lambda v: metrics[v]["latency_p50_ms"]):  # type: ignore[attr-defined]
        m = metrics[v]
        print(f"  {v:44s} {100 * m['accuracy']:6.2f} {m['accuracy_drop']:6.2f} {m['latency_p50_ms']:8.4f} "
              f"{m['size_mb']:8.3f}")


def clock() -> Tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t0: Tuple[float, float], plus: Tuple[float, float] = (0.0, 0.0)) -> Tuple[float, float]:
    """(wall, CPU time of this process) since ``t0``, plus ``plus``: on a shared machine the wall time moves
    with the other jobs' load, the CPU time much less."""
    now = clock()
    return now[0] - t0[0] + plus[0], now[1] - t0[1] + plus[1]


def compare(args, state: Path) -> int:
    from edgeopt.data.sources import load_dataset
    from edgeopt.measure.evaluate import evaluate_variants
    from edgeopt.measure.latency import cpu_fingerprint
    from edgeopt.search.outcome import build_survivor, render, search_report
    from edgeopt.search.study import run_worker
    from edgeopt.shrink.run import shrink_base
    from edgeopt.train.teacher import train_teacher

    print(fingerprint_line(cpu_fingerprint()))
    print(load_line("at the start"))
    grid_cfg, search_cfg = configs(args, state)
    dataset = load_dataset(grid_cfg.data, seed=grid_cfg.seed)
    teacher = train_teacher(dataset, grid_cfg.teacher, grid_cfg.seed)
    from edgeopt.plan import variant_plan

    plan = variant_plan(grid_cfg)
    reference = plan.reference_name
    opts = grid_cfg.variants.shrink["prune"]

    t0 = clock()
    base_models, base_evals = build(grid_cfg, dataset, teacher, lambda s: teacher,
                                    skip={s.key for s in plan.shrinks if s.technique})
    base_s = since(t0)

    t0 = clock()
    grid_models, grid_evals = build(grid_cfg, dataset, teacher, lambda s: shrink_base(
        teacher, teacher, dataset, "prune", s.amount, opts.model_copy(update={"amounts": [s.amount]}), grid_cfg.seed),
        skip={"teacher"})
    evaluate_variants(base_models + grid_models, {**base_evals, **grid_evals}, dataset, reference, grid_cfg.target)
    grid_s = since(t0, base_s)

    t0 = clock()
    run_worker(search_cfg, dataset, {"teacher": teacher}, teacher)
    report = search_report(search_cfg, dataset, {"teacher": teacher})
    search_models, search_evals = build(search_cfg, dataset, teacher, lambda s: build_survivor(
        report, s.base, s.slot, teacher, teacher, dataset, search_cfg.seed), skip={"teacher"})
    evaluate_variants(base_models + search_models, {**base_evals, **search_evals}, dataset, reference,
                      search_cfg.target)
    search_s = since(t0, base_s)

    joint = evaluate_variants(base_models + grid_models + search_models, {**base_evals, **grid_evals, **search_evals},
                              dataset, reference, grid_cfg.target)
    metrics = {r.variant: (r.metrics if r.ok else None) for r in joint.results}
    ref = metrics[reference]
    assert ref is not None
    ok = {k: v for k, v in metrics.items() if v is not None}
    grid = side("grid", {k: metrics[k] for k in metrics if not k.startswith("teacher-s")}, grid_cfg, ref)
    search = side("search", {k: metrics[k] for k in metrics if not k.startswith("teacher-p")}, search_cfg, ref)

    print()
    print(render(report))
    print("survivors: " + ", ".join(f"teacher-s{s.slot} = prune {s.amount:g}" for s in report.survivors))
    print_front(grid, ok)
    print_front(search, ok)
    for i, what in enumerate(("wall time", "CPU time of this process")):
        print(f"{what}: grid {grid_s[i]:.0f} s, search {search_s[i]:.0f} s ({100 * search_s[i] / grid_s[i]:.0f} % of "
              f"the grid's; the unpruned variants' {base_s[i]:.0f} s in both)")
    gb, sb = grid["best"], search["best"]
    p50_ok = bool(gb and sb and sb["latency_p50_ms"] <= GOAL["p50"] * gb["latency_p50_ms"]
                  and sb["accuracy_drop"] <= gb["accuracy_drop"] + 1e-9)
    hv_ratio = search["hv"] / grid["hv"] if grid["hv"] else float("nan")  # type: ignore[operator]
    if gb and sb:
        print(f"best feasible: grid {grid['winner']} p50 {gb['latency_p50_ms']:.4f} ms drop {gb['accuracy_drop']:.2f} pt;"
              f" search {search['winner']} p50 {sb['latency_p50_ms']:.4f} ms drop {sb['accuracy_drop']:.2f} pt")
    print(f"goal: best p50 within {100 * (GOAL['p50'] - 1):.0f} % at no larger drop -> {verdict(p50_ok)}; "
          f"hypervolume {100 * hv_ratio:.1f} % of the grid's (>= {100 * GOAL['hypervolume']:.0f} %) -> "
          f"{verdict(hv_ratio >= GOAL['hypervolume'])}; wall {100 * search_s[0] / grid_s[0]:.0f} % (<= "
          f"{100 * GOAL['wall']:.0f} %) -> {verdict(search_s[0] <= GOAL['wall'] * grid_s[0])} (CPU time "
          f"{100 * search_s[1] / grid_s[1]:.0f} % -> {verdict(search_s[1] <= GOAL['wall'] * grid_s[1])})")
    print(load_line("at the end"))
    return 0


def main(argv=None) -> int:
    return run_isolated(parse_args(argv), "edgeopt-search-bench-", compare)


if __name__ == "__main__":
    raise SystemExit(main())
