"""Selection: constraints, the Pareto front over (accuracy, latency, size), and the objective.

``select`` is deterministic and explains itself: every variant gets a verdict (failed, violates a
constraint, dominated by another, on the front) and the winner comes with the reason it won.

It is decided on the validation split: ``accuracy`` and ``accuracy_drop`` are validation figures
(:mod:`edgeopt.measure.evaluate`); ``test_accuracy`` and ``test_accuracy_drop`` are reported beside
them and never read here, so the test split stays a test of the variant chosen.
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional

from pydantic import BaseModel

from edgeopt.select.promotion import Decision

# (metric, sense): +1 higher is better, -1 lower is better
OBJECTIVES = {"accuracy": ("accuracy", +1), "latency": ("latency_p50_ms", -1), "size": ("size_mb", -1)}
FRONT_METRICS = [("accuracy", +1), ("latency_p50_ms", -1), ("size_mb", -1)]


class Verdict(BaseModel):
    variant: str
    status: Literal["failed", "infeasible", "dominated", "front"]
    reasons: List[str] = []


class Selection(BaseModel):
    winner: Optional[str]
    reason: str
    objective: str
    constraints: Dict[str, Optional[float]]
    verdicts: List[Verdict]

    @property
    def front(self) -> List[str]:
        return [v.variant for v in self.verdicts if v.status == "front"]


class TargetSelection(BaseModel):
    """One target device's own selection and champion-vs-challenger decision, on what that device
    measured. The first target's are the run's ``selection`` and ``decision``; its alias is the
    registry's, every other target's is ``<alias>-<label>``."""

    label: str
    fingerprint: str
    cpu: str
    alias: str
    selection: Selection
    decision: Decision


class TargetSelections(BaseModel):
    """Every target's selection, in the config's order (empty when the run measured locally)."""

    targets: List[TargetSelection] = []

    def winners_differ(self) -> bool:
        return len({t.selection.winner for t in self.targets}) > 1


def _dominates(a: dict, b: dict) -> bool:
    better_or_equal = all(sense * (a[m] - b[m]) >= 0 for m, sense in FRONT_METRICS)
    strictly = any(sense * (a[m] - b[m]) > 0 for m, sense in FRONT_METRICS)
    return better_or_equal and strictly


def _tied(a: dict, b: dict, metric: str) -> bool:
    """Whether two p50 latencies differ by less than the noise measured on them in the same run
    (only latency carries a noise estimate; accuracy and size ties are exact)."""
    if metric != "latency_p50_ms":
        return a[metric] == b[metric]
    noise = max(a.get("latency_noise_pct", 0.0), b.get("latency_noise_pct", 0.0)) / 100
    return abs(a[metric] - b[metric]) <= noise * min(a[metric], b[metric])


def violations(m: dict, constraints: Dict[str, Optional[float]]) -> List[str]:
    out = []
    if constraints.get("max_accuracy_drop") is not None and m["accuracy_drop"] > constraints["max_accuracy_drop"]:
        out.append(f"val accuracy drop {m['accuracy_drop']:.2f} pt > {constraints['max_accuracy_drop']} pt")
    if constraints.get("max_latency_ms") is not None and m["latency_p50_ms"] > constraints["max_latency_ms"]:
        out.append(f"p50 {m['latency_p50_ms']:.3f} ms > {constraints['max_latency_ms']} ms")
    if constraints.get("max_size_mb") is not None and m["size_mb"] > constraints["max_size_mb"]:
        out.append(f"size {m['size_mb']:.3f} MB > {constraints['max_size_mb']} MB")
    return out


def select(metrics: Dict[str, Optional[dict]], constraints: Dict[str, Optional[float]], objective: str) -> Selection:
    """``metrics``: variant -> its measured metrics, or None for a variant that failed. Accuracy is the
    validation split's (``accuracy``, ``accuracy_drop``); test figures are not read.

    The front is computed among the variants that meet every constraint; the winner is the front's
    best at ``objective``. Variants whose p50 latencies are within the noise measured in the run count
    as tied: the smallest of them wins, then the one with fewer MACs, so that a re-run of the same
    config promotes the same variant.
    """
    verdicts: Dict[str, Verdict] = {}
    feasible = {}
    for name, m in metrics.items():
        if m is None:
            verdicts[name] = Verdict(variant=name, status="failed", reasons=["the variant failed to build or evaluate"])
        elif v := violations(m, constraints):
            verdicts[name] = Verdict(variant=name, status="infeasible", reasons=v)
        else:
            feasible[name] = m
    for name, m in feasible.items():
        by = [o for o, om in feasible.items() if o != name and _dominates(om, m)]
        verdicts[name] = (
            Verdict(variant=name, status="dominated", reasons=[f"dominated by {', '.join(sorted(by))}"])
            if by else Verdict(variant=name, status="front")
        )
    front = [n for n in feasible if verdicts[n].status == "front"]
    metric, sense = OBJECTIVES[objective]
    if not front:
        reason = f"no variant meets the constraints ({len(metrics)} evaluated)"
        winner = None
    else:
        tiebreak = [metric] + [m for m, _ in FRONT_METRICS if m != metric]
        senses = dict(FRONT_METRICS)
        best = min(front, key=lambda n: tuple(-senses[k] * feasible[n][k] for k in tiebreak) + (n,))
        ties = [n for n in front if n == best or _tied(feasible[n], feasible[best], metric)]
        winner = min(ties, key=lambda n: (feasible[n]["size_mb"], feasible[n].get("macs", 0.0), n))
        w = feasible[winner]
        runner = sorted((n for n in front if n != winner), key=lambda n: -sense * feasible[n][metric])
        reason = (
            f"{winner} is on the Pareto front of the {len(feasible)} feasible variants "
            f"and has the best {objective} ({metric}={w[metric]:.4g})"
        )
        if len(ties) > 1:
            noise = max(feasible[n].get("latency_noise_pct", 0.0) for n in ties)
            reason = (f"{winner} ties on {objective} with {', '.join(sorted(n for n in ties if n != winner))} within "
                      f"the measured noise (±{noise:.1f} %) and is the smallest of them (then fewest MACs), so the "
                      f"same config promotes the same variant run after run")
        if runner:
            reason += f"; next best on the front: {runner[0]} ({metric}={feasible[runner[0]][metric]:.4g})"
    order = {"front": 0, "dominated": 1, "infeasible": 2, "failed": 3}
    return Selection(
        winner=winner, reason=reason, objective=objective, constraints=dict(constraints),
        verdicts=sorted(verdicts.values(), key=lambda v: (order[v.status], v.variant)),
    )
