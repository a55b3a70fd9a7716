"""Promotion: register the winner's ``model/`` as a model version and point the alias (``champion``)
at it, compare-and-set under the promotion lease, with the audit trail of what was done and why."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from pydantic import BaseModel

from edgeopt.measure.evaluate import Evaluation
from edgeopt.registry.lease import LEASE_SECONDS, Lease, blocked
from edgeopt.registry.versions import alias_version, register_version, run_model_sha256, set_alias
from edgeopt.select.pareto import Selection
from edgeopt.select.promotion import Decision
from edgeopt.track.runs import SERVING_FILE, TrackedRuns
from edgeopt.track.uri import client_for

log = logging.getLogger(__name__)


class PromotionResult(BaseModel):
    """What ``promote`` did and why: the audit trail of one run (the version, when promoted)."""

    promoted: bool
    reason: str
    rule: str
    checks: List[str]
    champion_before: Optional[str]
    winner: Optional[str]
    registered_model: Optional[str] = None
    version: Optional[str] = None
    alias: Optional[str] = None
    variant: Optional[str] = None
    run_id: Optional[str] = None
    runtime: Optional[str] = None
    runtime_settings: Dict[str, Any] = {}
    metrics: Dict[str, float] = {}
    lineage: Dict[str, Optional[str]] = {}


def promote_winner(
    *, uri: str, name: str, alias: str, selection: Selection, evaluation: Evaluation, decision: Decision,
    runs: TrackedRuns, tags: Dict[str, str], lease_seconds: float = LEASE_SECONDS,
) -> PromotionResult:
    """Register the winner as a new version of ``name`` and move ``alias`` to it, if ``decision`` says so.

    Compare-and-set under the registry's promotion lease (``edgeopt.registry.lease.Lease``, exclusive
    across hosts that share only the tracking URI): if another run moved the alias since this run
    measured the champion, nothing is promoted (the comparison would be against a stale champion);
    a model that was rolled back (by sha256) is not promoted until ``edgeopt unblock`` clears it.
    The winner's run must hold ``serving/serving.json`` (labels, preprocessing; logged by
    :func:`edgeopt.track.runs.log_pipeline_run`): every deployment of the version reads it from there.
    Returns what was done and why.
    """
    measured = evaluation.champion_version
    base = PromotionResult(promoted=False, reason=decision.reason, rule=decision.rule, checks=decision.checks,
                           champion_before=measured, winner=selection.winner)
    if not decision.promote:
        log.warning("promote: nothing promoted: %s", decision.reason)
        return base
    assert selection.winner is not None  # a promotion decision has a winner
    w = evaluation.result(selection.winner)
    run_id = runs.variant_runs[selection.winner]
    sha = run_model_sha256(uri, run_id)
    if not client_for(uri).list_artifacts(run_id, SERVING_FILE.split("/")[0]):
        reason = f"{w.variant}: its run {run_id} has no {SERVING_FILE} (labels, preprocessing); not promoted"
        log.warning("promote: %s", reason)
        return base.model_copy(update={"reason": reason})
    with Lease(uri, name, ttl=lease_seconds) as lease:
        current = alias_version(uri, name, alias)
        now = str(current.version) if current is not None else None
        if now != measured:
            reason = (f"the champion moved from v{measured} to v{now} while this run was measuring; "
                      "not promoted (re-run to compare against the new champion)")
            log.warning("promote: %s", reason)
            return base.model_copy(update={"reason": reason})
        note = blocked(uri, name).get(sha)
        if note is not None:
            reason = (f"{w.variant} is the model {note} (model sha256 {sha[:12]}); not promoted until "
                      f"`edgeopt unblock -c <config> --model {sha[:12]}`")
            log.warning("promote: %s", reason)
            return base.model_copy(update={"reason": reason})
        if current is not None and current.tags.get("model_sha256") == sha \
                and current.tags.get("runtime") == str(w.recipe["runtime"]):
            reason = (f"{w.variant} is the champion v{now}'s own model (model sha256 {sha[:12]}) on the same "
                      "runtime; nothing new to promote")
            log.info("promote: %s", reason)
            return base.model_copy(update={"reason": reason})
        lease.check()
        version = register_version(uri, name, run_id, tags={
            **tags, "variant": w.variant, "runtime": str(w.recipe["runtime"]), "rule": decision.rule,
            "decision": decision.reason, "pareto_front": ",".join(selection.front), "model_sha256": sha,
            **{k: f"{v:.6g}" for k, v in w.metrics.items() if k in ("accuracy", "latency_p50_ms", "size_mb")},
        }, description=decision.reason, model_id=runs.variant_models.get(selection.winner))
        lease.check()
        set_alias(uri, name, alias, version)
    log.info("promote: %s -> %s version %s (alias %r): %s", w.variant, name, version, alias, decision.reason)
    return base.model_copy(update={
        "promoted": True, "registered_model": name, "version": str(version), "alias": alias, "variant": w.variant,
        "run_id": run_id, "runtime": str(w.recipe["runtime"]), "runtime_settings": w.runtime_settings,
        "metrics": w.metrics, "lineage": w.lineage,
    })
