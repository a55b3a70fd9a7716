"""What a study found: every trial and why it stopped, and the survivors the pipeline builds in full.

Survivors, per base, up to ``variants.search.survivors`` distinct models:

- where a latency or size target binds (or the objective is accuracy): for each runtime where the
  unpruned base breaks the target, the candidate that keeps the most of the model (most parameters:
  the least compression) among those meeting the target on that runtime; then the next least compressed
  that meet it anywhere;
- else: the trials that finished their short fine-tunes, best score first (the objective, within the
  accuracy budget), ties to the one keeping more of the model; then those successive halving stopped,
  by their last score. Beyond the first, only candidates within the accuracy budget (plus the slack).

A candidate rejected before its fine-tune never survives; a slot the search cannot fill is left empty
(its variants are reported as not built, with the reason).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional

from pydantic import BaseModel

from edgeopt.artifacts import Checkpoint, Dataset, new_workdir
from edgeopt.config import RunConfig
from edgeopt.search.space import Combo, Judge
from edgeopt.search.study import open_study, retried, storage_url, study_name

log = logging.getLogger(__name__)


class TrialRecord(BaseModel):
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    base: str = ""
    technique: str = ""
    amount: float = math.nan
    choices: Dict[str, Any] = {}
    label: str = ""
    stop: str = ""
    params: Optional[int] = None
    macs: Optional[int] = None
    combos: Dict[str, Dict[str, float]] = {}  # combination -> p50_ms, size_mb, noise_pct, base_p50_ms
    rungs: List[List[float]] = []  # [fine-tune steps so far, val accuracy, drop (pt), score] at each rung reached
    steps: int = 0  # optimizer steps of its one fine-tune, continued through its rungs (0: it ran none)
    value: Optional[float] = None  # the final score (COMPLETE) or the last reported one
    seconds: Optional[float] = None
    worker: str = ""
    signature: str = ""
    trained: bool = False  # reached a fine-tune (not rejected before one)
    same_as: Optional[int] = None  # the trial whose outcome it took (the same model, or a repeat of its parameters)

    @property
    def accuracy(self) -> Optional[float]:
        return self.rungs[-1][1] if self.rungs else None


class Survivor(BaseModel):
    base: str
    slot: int
    trial: int
    label: str
    technique: str
    amount: float
    options: Dict[str, Any]
    why: str


class SearchReport(BaseModel):
    study: str
    storage: str
    sampler: str
    objective: Dict[str, str]  # base -> what the search optimized for it
    reference_accuracy: Optional[float]
    trials: List[TrialRecord]
    survivors: List[Survivor]
    finetune_trials: int  # trials that ran a fine-tune (one each, continued through its rungs)
    finetune_steps: int = 0  # their optimizer steps, all together

    @property
    def restart_steps(self) -> int:
        """The optimizer steps the same rungs would have taken had each rung started its fine-tune over."""
        return sum(int(r[0]) for t in self.trials if t.trained for r in t.rungs)

    def survivors_only(self) -> "SearchReport":
        """What the survivors' fine-tunes depend on, without what changes from run to run (the trials)."""
        return self.model_copy(update={"trials": [], "finetune_trials": 0, "finetune_steps": 0})

    def slot(self, base: str, slot: int) -> Optional[Survivor]:
        return next((s for s in self.survivors if s.base == base and s.slot == slot), None)


def _record(t: Any, retries: Dict[int, int]) -> TrialRecord:
    a = t.user_attrs
    cand, probe = a.get("candidate", {}), a.get("probe") or {}
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    return TrialRecord(
        number=t.number, state=t.state.name, base=cand.get("base", ""), technique=cand.get("technique", ""),
        amount=cand.get("amount", math.nan), choices=cand.get("choices", {}), label=cand.get("label", ""),
        stop=(f"killed with its worker: its candidate ran again as trial #{retries[t.number]}" if t.number in retries
              else a.get("stop", "waiting" if t.state.name == "WAITING" else "")), params=probe.get("params"),
        macs=probe.get("macs"), combos=probe.get("combos", {}), rungs=a.get("rungs", []),
        value=t.value if t.value is not None else last, seconds=seconds, worker=a.get("worker", ""),
        signature=probe.get("signature", ""), trained=bool(a.get("rungs")) and "same_as" not in a,
        steps=0 if "same_as" in a else int(a.get("finetune_steps", 0)), same_as=a.get("same_as"),
    )


def _meets(judge: Judge, t: TrialRecord, runtime: Optional[str] = None) -> bool:
    """Whether ``t`` meets the target on some combination (of ``runtime``)."""
    return any(judge.meets(Combo(**c)) for k, c in t.combos.items() if runtime is None or k.endswith(f"@{runtime}"))


def choose_survivors(cfg: RunConfig, trials: List[TrialRecord], judges: Dict[str, Judge],
                     base_combos: Dict[str, Dict[str, Combo]]) -> List[Survivor]:
    """The survivors of every base (module docstring), slot by slot."""
    search = cfg.variants.search
    assert search is not None
    out: List[Survivor] = []
    for base in cfg.variants.bases:
        judge = judges.get(base)
        mine = [t for t in trials if t.base == base and t.params is not None and t.state != "FAIL" and t.combos
                and not t.stop.startswith("rejected") and t.same_as is None]  # a twin stands for its original
        if judge is None or not mine:
            continue
        picks: List[tuple] = []
        if judge.by_accuracy:
            least = sorted(mine, key=lambda t: (-(t.params or 0), -(t.accuracy or -1.0), t.number))
            runtimes = sorted({k.split("@")[1] for t in mine for k in t.combos})
            for rt in runtimes:
                if any(judge.meets(c) for k, c in base_combos.get(base, {}).items() if k.endswith(f"@{rt}")):
                    continue  # the unpruned base meets the target there: nothing to compress
                if (t := next((t for t in least if _meets(judge, t, rt)), None)) is not None:
                    picks.append((t, f"the least compression that meets the target on {rt} "
                                     f"({t.params:,} parameters kept)"))
            picks += [(t, "the next least compression that meets the target") for t in least if _meets(judge, t)]
        else:
            done = sorted((t for t in mine if t.state == "COMPLETE" and t.value is not None),
                          key=lambda t: (-(t.value or 0.0), -(t.params or 0), t.number))
            halted = sorted((t for t in mine if t.state == "PRUNED" and t.trained and t.value is not None),
                            key=lambda t: (-len(t.rungs), -(t.value or 0.0), -(t.params or 0), t.number))
            picks += [(t, f"best score after the short fine-tunes ({t.value:.2f})") for t in done]
            picks += [(t, f"stopped by successive halving, next best ({t.value:.2f})") for t in halted]
            # beyond the best one, a full fine-tune goes only to a candidate within the accuracy budget
            picks = picks[:1] + [(t, why) for t, why in picks[1:] if (t.value or 0.0) > 0]
        seen: set = set()
        for t, why in picks:
            if t.signature in seen or len(seen) == search.survivors:
                continue
            seen.add(t.signature)
            opts = search.shrink[t.technique].options.model_copy(update={**t.choices, "amounts": [t.amount]})
            out.append(Survivor(base=base, slot=len(seen), trial=t.number, label=t.label, technique=t.technique,
                                amount=t.amount, options=opts.model_dump(mode="json"), why=why))
    return out


def search_report(cfg: RunConfig, dataset: Dataset, bases: Dict[str, Checkpoint]) -> SearchReport:
    """The study of this run, read back from its storage (every worker's trials), with its survivors."""
    from edgeopt.track.uri import redact_uri

    search = cfg.variants.search
    assert search is not None
    name = study_name(cfg, dataset, bases)
    study = open_study(cfg, name, load_only=True)
    attrs = study.user_attrs
    frozen = study.get_trials(deepcopy=False)
    trials = [_record(t, retried(frozen)) for t in frozen]
    base_combos: Dict[str, Dict[str, Combo]] = {b: {k: Combo(**c) for k, c in attrs[f"base.{b}"].items()}
                                                for b in cfg.variants.bases if f"base.{b}" in attrs}
    judges: Dict[str, Judge] = {b: Judge.of(cfg, Judge.of(cfg, False).binds(c)) for b, c in base_combos.items()}
    objective = {b: ("least compression that meets the target" if j.by_accuracy and cfg.selection.objective != "accuracy"
                     else f"{cfg.selection.objective} within the accuracy budget") for b, j in judges.items()}
    report = SearchReport(
        study=name, storage=redact_uri(storage_url(cfg)), sampler=search.sampler, objective=objective,
        reference_accuracy=attrs.get("reference_accuracy"), trials=trials,
        survivors=choose_survivors(cfg, trials, judges, base_combos),
        finetune_trials=sum(t.trained for t in trials), finetune_steps=sum(t.steps for t in trials),
    )
    log.info("search: study %s: %d trials (%d fine-tuned, %d steps), survivors %s", name, len(trials),
             report.finetune_trials, report.finetune_steps,
             ", ".join(f"{s.base}-s{s.slot}={s.label}" for s in report.survivors))
    return report


def build_survivor(report: SearchReport, base_name: str, slot: int, base: Checkpoint, kd_teacher: Checkpoint,
                   dataset: Dataset, seed: int) -> Checkpoint:
    """The survivor in ``slot`` of ``base_name`` with the technique's full fine-tune (``shrink_base``, as a
    grid variant of that amount gets it); a slot the search left empty is a checkpoint that says so."""
    from edgeopt.shrink.base import get
    from edgeopt.shrink.run import shrink_base

    s = report.slot(base_name, slot)
    if s is None:
        reason = f"the search left no survivor #{slot} of the {base_name} (study {report.study})"
        log.warning("search: %s", reason)
        return Checkpoint.write(new_workdir("searched"), {"role": "searched", "base": base_name, "learned": False,
                                                          "reason": reason, "tag": f"s{slot}"})
    log.info("search: %s-s%d is trial #%d, %s: %s", base_name, slot, s.trial, s.label, s.why)
    return shrink_base(base, kd_teacher, dataset, s.technique, s.amount, get(s.technique).Options.model_validate(
        s.options), seed, export_checked=True)  # its trial's probe built every format of it


def render(report: SearchReport) -> str:
    """The study as Markdown: what it optimized, every trial and why it stopped, the survivors."""
    lines = [f"# Search: study `{report.study}`", "",
             f"Storage {report.storage}; sampler {report.sampler}; optimized: "
             + "; ".join(f"{b}: {o}" for b, o in report.objective.items())
             + f". {len(report.trials)} trials, {report.finetune_trials} fine-tuned: {report.finetune_steps} "
               f"optimizer steps, each trial's rungs one continued fine-tune ({report.restart_steps} had each rung "
               f"started over); reference val acc "
             + ("n/a" if report.reference_accuracy is None else f"{report.reference_accuracy:.4f}") + ".", "",
             "| trial | candidate | state | params | best p50 ms | smallest MB | val acc | score | why it stopped |",
             "|---|---|---|---|---|---|---|---|---|"]
    slots = {s.trial: f"{s.base}-s{s.slot}" for s in report.survivors}
    for t in report.trials:
        stop = t.stop + (f"; survivor: {slots[t.number]} (full fine-tune)" if t.number in slots else "")
        p50 = min((c["p50_ms"] for c in t.combos.values()), default=math.nan)
        size = min((c["size_mb"] for c in t.combos.values()), default=math.nan)
        acc = "" if t.accuracy is None else f"{t.accuracy:.4f}"
        value = "" if t.value is None else f"{t.value:.2f}"
        lines.append(f"| {t.number} | {t.label} | {t.state} | {t.params or ''} | {p50:.4g} | {size:.4g} | {acc} | "
                     f"{value} | {stop} |")
    lines += ["", "Survivors (full fine-tune, every precision, the pipeline's evaluation):", ""]
    lines += [f"- {s.base}-s{s.slot}: trial #{s.trial}, {s.label}: {s.why}" for s in report.survivors] or ["- none"]
    return "\n".join(lines) + "\n"
