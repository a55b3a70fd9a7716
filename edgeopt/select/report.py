"""What a person reads: the variants table, the selection report (Markdown) and the Pareto plot.

Each carries the validation accuracy (what the winner was chosen on) and the test accuracy (reported,
never used to choose)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

from edgeopt.artifacts import FolderArtifact, new_workdir
from edgeopt.measure.evaluate import Evaluation
from edgeopt.measure.latency import versions_text
from edgeopt.select.pareto import Selection, TargetSelections
from edgeopt.select.promotion import Decision

STATUS_MARK = {"front": "front", "dominated": "dominated", "infeasible": "infeasible", "failed": "FAILED"}
SPLITS_NOTE = "chosen on the validation split; test figures reported, never used to choose"


def variants_table(ev: Evaluation, sel: Selection) -> str:
    """A fixed-width table, one row per variant, winner marked with '*', reference marked with '='.
    'val %' and 'test %' are the accuracy on each split; 'drop' is the validation accuracy's drop from the
    reference (points), what the constraints read; 'x smaller' and 'x faster' are against the reference
    (same run); '±' is the p50's measured noise; 'int8' is the share of convolution/matmul layers the
    runtime really executes in INT8."""
    head = (f"{'':1} {'variant':36} {'val %':>7} {'test %':>7} {'drop':>6} {'p50 ms':>8} {'±%':>5} {'p95 ms':>8} "
            f"{'size kB':>9} {'x smaller':>9} {'x faster':>8} {'int8':>5}  verdict")
    rows: List[str] = [head, "-" * len(head)]
    for v in sel.verdicts:
        r = ev.result(v.variant)
        mark = "*" if v.variant == sel.winner else "=" if v.variant == ev.reference.variant else ""
        if not r.ok:
            rows.append(f"{mark:1} {v.variant:36} {'-':>7} {'-':>7} {'-':>6} {'-':>8} {'-':>5} {'-':>8} {'-':>9} {'-':>9} "
                        f"{'-':>8} {'-':>5}  FAILED: {r.reason}")
            continue
        m = r.metrics
        rows.append(
            f"{mark:1} {v.variant:36} {100 * m['accuracy']:7.2f} {100 * m['test_accuracy']:7.2f} {m['accuracy_drop']:6.2f} "
            f"{m['latency_p50_ms']:8.3f} "
            f"{m['latency_noise_pct']:5.1f} {m['latency_p95_ms']:8.3f} {m['size_mb'] * 1e3:9.1f} "
            f"{m['compression_ratio']:9.1f} {m['speedup_vs_reference']:8.2f} {100 * m.get('int8_fraction', 0):4.0f}%  "
            f"{STATUS_MARK[v.status]}"
            + (f" ({'; '.join(v.reasons)})" if v.status == "infeasible" else "")
        )
    t = ev.reference
    rows.append(
        f"= reference {t.variant} (FP32, same run): val acc {100 * t.accuracy:.2f} %, test acc "
        f"{100 * t.test_accuracy:.2f} %, p50 {t.latency_p50_ms:.3f} ms, "
        f"{t.size_mb * 1e3:.1f} kB" + (", outputs probabilities" if t.output == "probabilities" else "")
    )
    c = ev.champion
    if c is not None:
        rows.append(
            f"champion {c.variant}: " + (
                f"val acc {100 * c.metrics['accuracy']:.2f} %, test acc {100 * c.metrics['test_accuracy']:.2f} %, "
                f"p50 {c.metrics['latency_p50_ms']:.3f} ms, "
                f"{c.metrics['size_mb'] * 1e3:.1f} kB (re-measured in this run)" if c.ok else f"FAILED: {c.reason}"
            )
        )
    return "\n".join(rows)


def measured_on(ev: Evaluation) -> str:
    fp = ev.fingerprint
    where = f"target `{ev.label}` ({ev.device['url']}): " if ev.device else ""
    return (f"{where}{fp['cpu']} ({fp['cores']} cores, ISA {', '.join(fp['isa']) or 'baseline'}), "
            f"{ev.target['threads']} thread(s), batch {ev.target['batch']}, {ev.target['iterations']} iterations after "
            f"{ev.target['warmup']} warm-up; {versions_text(fp) or 'runtime versions unknown'} (fingerprint {fp['id']})")


def targets_section(ev: Evaluation, targets: TargetSelections) -> List[str]:
    """Every device's winner, and where the winners differ, each winner's p50 on every device."""
    lines = ["## Devices", "", "| target | fingerprint | CPU | winner | val % | test % | p50 ms | decision |",
             "|---|---|---|---|---|---|---|---|"]
    for e, t in zip(ev.devices, targets.targets):
        w = e.result(t.selection.winner).metrics if t.selection.winner else None
        lines.append(
            f"| {t.label} (alias `{t.alias}`) | {t.fingerprint} | {t.cpu} | {t.selection.winner or 'none'} | "
            + (f"{100 * w['accuracy']:.2f} | {100 * w['test_accuracy']:.2f} | {w['latency_p50_ms']:.4f}" if w else "- | - | -")
            + f" | {'promote' if t.decision.promote else 'keep'}: {t.decision.reason} |"
        )
    errors = [f"- `{e.label}`: {e.error}" for e in ev.devices if e.error]
    if errors:
        lines += ["", "**Devices that measured nothing:**", "", *errors]
    winners = sorted({t.selection.winner for t in targets.targets if t.selection.winner})
    lines.append("")
    if not winners:
        lines.append("**No device has a winner.**")
        return lines
    if not targets.winners_differ():
        lines.append(f"**Every device picks the same winner:** {winners[0]}.")
        return lines
    lines += ["**The devices' winners differ.** p50 (ms) of each device's winner on every device "
              "(* the device's own winner; each column measured in one loop on that device):", "",
              "| variant | " + " | ".join(t.label for t in targets.targets) + " |",
              "|---|" + "---|" * len(targets.targets)]
    for name in winners:
        cells = []
        for e, t in zip(ev.devices, targets.targets):
            r = next((x for x in e.results if x.variant == name), None)
            cell = f"{r.metrics['latency_p50_ms']:.4f}" if r is not None and r.ok else "failed"
            cells.append(cell + (" *" if t.selection.winner == name else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def winner_figures(ev: Evaluation, sel: Selection) -> List[str]:
    """The winner's test accuracy and drop (the figures to quote) beside the validation ones it was chosen on."""
    if not sel.winner:
        return []
    m = ev.result(sel.winner).metrics
    return [f"**Winner's accuracy:** test {100 * m['test_accuracy']:.2f} % (drop {m['test_accuracy_drop']:.2f} pt vs "
            f"the reference's {100 * ev.reference.test_accuracy:.2f} %); validation {100 * m['accuracy']:.2f} % (drop "
            f"{m['accuracy_drop']:.2f} pt), {SPLITS_NOTE}.", ""]


def selection_report(ev: Evaluation, sel: Selection, decision: Decision, run_name: str,
                     targets: Optional[TargetSelections] = None) -> str:
    """The run's report: winner, why, promotion, the rule, the variants table; with target devices,
    the first device's selection first, then every device's winner and each other device's table."""
    c = {k: v for k, v in sel.constraints.items() if v is not None}
    lines = [
        f"# Selection report: {run_name}",
        "",
        f"**Winner:** {sel.winner or 'none'}" + (f" (on target `{ev.label}`, which drives the champion and the deploy "
                                                 "folder)" if ev.others else ""),
        "",
        f"**Why:** {sel.reason}.",
        "",
        *winner_figures(ev, sel),
        f"**Promotion:** {'promote' if decision.promote else 'keep the champion'}: {decision.reason}.",
        "",
        f"**Promotion rule (champion vs challenger, same run):** {decision.rule}.",
        "",
        *[f"- {c}" for c in decision.checks],
        *([""] if decision.checks else []),
        f"**Rule:** drop every variant that violates a constraint ({', '.join(f'{k}={v}' for k, v in c.items()) or 'none'}), "
        f"keep the Pareto front over (validation accuracy up, p50 latency down, size down), pick the best "
        f"`{sel.objective}` on it.",
        "",
        f"**Splits:** {SPLITS_NOTE}: the constraints, the Pareto front, the objective, the ties and the promotion "
        "rule read the validation accuracy; the test accuracy of the winner is the figure to quote.",
        "",
        f"**Measured on:** {measured_on(ev)}. All latencies below come from this one run.",
        "",
    ]
    lines += [f"> error: {ev.error}"] + [""] if ev.error else []
    lines += [f"> warning: {w}" for w in ev.warnings] + ([""] if ev.warnings else [])
    lines += ["```", variants_table(ev, sel), "```", "", "## Verdicts", ""]
    lines += [f"- `{v.variant}`: {v.status}" + (f": {'; '.join(v.reasons)}" if v.reasons else "") for v in sel.verdicts]
    if targets is not None and targets.targets:
        lines += ["", *targets_section(ev, targets)]
        for e, t in zip(ev.others, targets.targets[1:]):
            lines += ["", f"### Target `{t.label}`", "", f"**Measured on:** {measured_on(e)}.", "",
                      f"**Winner:** {t.selection.winner or 'none'}: {t.selection.reason}.", "",
                      f"**Promotion (alias `{t.alias}`):** {'promote' if t.decision.promote else 'keep'}: "
                      f"{t.decision.reason}.", "", *[f"> warning: {w}" for w in e.warnings],
                      "```", variants_table(e, t.selection), "```"]
    return "\n".join(lines) + "\n"


def pareto_plot(ev: Evaluation, sel: Selection, path: Path) -> Path:
    """Accuracy vs p50 latency, marker area ~ size; front joined, winner starred, reference marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    status = {v.variant: v.status for v in sel.verdicts}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    style = {"front": ("tab:blue", 1.0), "dominated": ("tab:gray", 0.6), "infeasible": ("tab:red", 0.4)}
    ok = [r for r in ev.results if r.ok]
    max_size = max((r.metrics["size_mb"] for r in ok), default=1.0)
    for st, (color, alpha) in style.items():
        pts = [r for r in ok if status.get(r.variant) == st]
        if pts:
            ax.scatter([r.metrics["latency_p50_ms"] for r in pts], [100 * r.metrics["accuracy"] for r in pts],
                       s=[40 + 400 * r.metrics["size_mb"] / max_size for r in pts], c=color, alpha=alpha,
                       label=st, edgecolors="black", linewidths=0.5)
    for r in ok:
        ax.annotate(r.variant, (r.metrics["latency_p50_ms"], 100 * r.metrics["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((r for r in ok if status.get(r.variant) == "front"), key=lambda r: r.metrics["latency_p50_ms"])
    if len(front) > 1:
        ax.plot([r.metrics["latency_p50_ms"] for r in front], [100 * r.metrics["accuracy"] for r in front],
                "--", color="tab:blue", linewidth=1)
    if sel.winner:
        w = ev.result(sel.winner).metrics
        ax.scatter([w["latency_p50_ms"]], [100 * w["accuracy"]], marker="*", s=400, c="gold",
                   edgecolors="black", label=f"winner: {sel.winner}", zorder=5)
    t = ev.reference
    if math.isfinite(t.latency_p50_ms):  # a device that measured nothing has no reference to draw
        ax.scatter([t.latency_p50_ms], [100 * t.accuracy], marker="D", c="black", label=f"reference: {t.variant}")
        drop = sel.constraints.get("max_accuracy_drop")
        if drop is not None:
            ax.axhline(100 * t.accuracy - drop, color="tab:red", linestyle=":", linewidth=1, label=f"max drop {drop} pt")
        lat = sel.constraints.get("max_latency_ms")
        if lat is not None:
            ax.axvline(lat, color="tab:red", linestyle="-.", linewidth=1, label=f"max p50 {lat} ms")
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, f"nothing measured on {ev.label}:\n{ev.error}", ha="center", va="center", wrap=True,
                transform=ax.transAxes)
    ax.set_xlabel(f"p50 latency, ms (log; batch {ev.target['batch']}, {ev.target['threads']} thread(s))")
    ax.set_ylabel("validation accuracy, % (what selection reads)")
    ax.set_title("Variants: accuracy vs latency (marker area ~ model size)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class PlotImage(FolderArtifact):
    """A rendered plot (PNG) as an artifact, so ZenML's dashboard can show it."""

    KIND = "image"

    @property
    def png(self) -> Path:
        return self.path / self.manifest["image"]


def pareto_plot_artifact(ev: Evaluation, sel: Selection) -> PlotImage:
    out = new_workdir("plot")
    pareto_plot(ev, sel, out / "pareto.png")
    return PlotImage.write(out, {"image": "pareto.png", "winner": sel.winner})
