"""The search's trials in MLflow: one run per trial nested under the pipeline's run, beside the variant runs.

A trial run carries the metrics a variant run does where the trial has them (``accuracy`` and
``accuracy_drop`` on validation after its last short fine-tune, ``latency_p50_ms`` and ``size_mb`` of its
fastest and smallest combination, ``params``, ``macs``), each combination's as ``<combination>.<metric>``,
the accuracy after every rung as ``rung_accuracy`` (step: fine-tune steps), the optimizer steps its one
fine-tune ran through its rungs as ``finetune_steps``, its candidate as params, and
why it stopped as the tag ``search.stop``. Status: FINISHED (the short fine-tunes ran), KILLED (stopped
before or between them), FAILED. The parent run gets the search's table as ``report/search.md``.
"""

from __future__ import annotations

import re
import time
from typing import Dict

from edgeopt.search.outcome import SearchReport, TrialRecord

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
_METRIC_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")  # characters MLflow refuses in a metric name


def trial_metrics(t: TrialRecord, reference_accuracy: float | None) -> Dict[str, float]:
    out: Dict[str, float] = {}
    if t.params is not None:
        out.update(params=float(t.params), macs=float(t.macs or 0))
    if t.combos:
        out["latency_p50_ms"] = min(c["p50_ms"] for c in t.combos.values())
        out["size_mb"] = min(c["size_mb"] for c in t.combos.values())
    for name, c in t.combos.items():
        key = _METRIC_BAD.sub("-", name)
        out.update({f"{key}.latency_p50_ms": c["p50_ms"], f"{key}.size_mb": c["size_mb"],
                    f"{key}.speedup_vs_base": c["base_p50_ms"] / c["p50_ms"]})
    if t.steps:
        out["finetune_steps"] = float(t.steps)
    if t.accuracy is not None:
        out["accuracy"] = t.accuracy
        if reference_accuracy is not None:
            out["accuracy_drop"] = 100 * (reference_accuracy - t.accuracy)
    return out


def log_trial_runs(uri: str, experiment_id: str, parent_run_id: str, report: SearchReport, markdown: str,
                   tags: Dict[str, str]) -> Dict[int, str]:
    """A nested run per trial under ``parent_run_id``; returns trial number -> run id."""
    from mlflow.entities import Metric, Param

    from edgeopt.track.uri import client_for

    client = client_for(uri)
    slots = {s.trial: f"{s.base}-s{s.slot}" for s in report.survivors}
    runs = {}
    for t in report.trials:
        if t.state in ("WAITING", "RUNNING"):
            continue
        run = client.create_run(experiment_id, run_name=f"trial-{t.number}: {t.label}", tags={
            **tags, "mlflow.parentRunId": parent_run_id, "edgeopt.role": "trial", "search.study": report.study,
            "search.state": t.state, "search.stop": t.stop[:5000], "base": t.base, "search.worker": t.worker,
            "search.survivor": slots.get(t.number, ""),
        })
        rid = run.info.run_id
        params = {"trial": t.number, "technique": t.technique, "amount": t.amount,
                  **{f"choice.{k}": v for k, v in t.choices.items()}}
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in trial_metrics(t, report.reference_accuracy).items()]
        metrics += [Metric("rung_accuracy", float(r[1]), now, int(r[0])) for r in t.rungs]
        client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(rid, STATUS.get(t.state, "FAILED"))
        runs[t.number] = rid
    client.log_text(parent_run_id, markdown, "report/search.md")
    return runs
