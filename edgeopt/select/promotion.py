"""Champion vs challenger: may this run's winner replace the current champion?

Both were measured in the same process by the same harness (absolute latencies drift between
machines and runs; only same-run comparisons count). Every configured condition must hold; the
decision names the rule and the numbers that decided it. Accuracy is compared on the validation
split; the test figures are shown beside it, never decided on.
"""

from __future__ import annotations

import math
from typing import List, Optional

from pydantic import BaseModel

from edgeopt.config import PromotionConfig
from edgeopt.measure.evaluate import VariantResult


class Decision(BaseModel):
    promote: bool
    reason: str
    rule: str
    checks: List[str] = []
    champion: Optional[str] = None


def rule_text(rule: PromotionConfig) -> str:
    parts = [f"val accuracy loss vs champion <= {rule.max_accuracy_loss} pt"]
    if rule.min_latency_gain_pct is not None:
        parts.append(f"p50 latency at least {rule.min_latency_gain_pct}% lower")
    if rule.min_size_gain_pct is not None:
        parts.append(f"file at least {rule.min_size_gain_pct}% smaller")
    return " and ".join(parts)


def decide(winner: Optional[VariantResult], champion: Optional[VariantResult], rule: PromotionConfig,
           no_winner_reason: str = "") -> Decision:
    text = rule_text(rule)
    if winner is None:
        return Decision(promote=False, reason=f"no candidate to promote: {no_winner_reason}", rule=text)
    if champion is None:
        return Decision(promote=True, reason="there is no champion yet: the winner becomes the first", rule=text)
    if not champion.ok:
        if rule.replace_unmeasured_champion:
            return Decision(promote=True, champion=champion.variant, rule=text,
                            reason=f"the champion could not be re-measured on this target ({champion.reason}): "
                                   "the winner replaces it (promotion.replace_unmeasured_champion)")
        return Decision(promote=False, champion=champion.variant, rule=text,
                        reason=f"the champion could not be re-measured on this target ({champion.reason}): "
                               "kept, nothing compared; set promotion.replace_unmeasured_champion: true to let "
                               "the winner replace it")
    w, c = winner.metrics, champion.metrics
    loss = 100 * (c["accuracy"] - w["accuracy"])
    checks = [("accuracy", loss <= rule.max_accuracy_loss,
               f"val accuracy {100 * w['accuracy']:.2f}% vs champion {100 * c['accuracy']:.2f}% "
               f"(loss {loss:.2f} pt, allowed {rule.max_accuracy_loss}; test "
               f"{100 * w.get('test_accuracy', math.nan):.2f}% vs {100 * c.get('test_accuracy', math.nan):.2f}%, "
               "reported, not decided on)")]
    if rule.min_latency_gain_pct is not None:
        gain = 100 * (1 - w["latency_p50_ms"] / c["latency_p50_ms"])
        checks.append(("latency", gain >= rule.min_latency_gain_pct,
                       f"p50 {w['latency_p50_ms']:.4f} ms vs champion {c['latency_p50_ms']:.4f} ms "
                       f"(gain {gain:.1f}%, required {rule.min_latency_gain_pct}%)"))
    if rule.min_size_gain_pct is not None:
        gain = 100 * (1 - w["size_mb"] / c["size_mb"])
        checks.append(("size", gain >= rule.min_size_gain_pct,
                       f"size {1e3 * w['size_mb']:.1f} kB vs champion {1e3 * c['size_mb']:.1f} kB "
                       f"(gain {gain:.1f}%, required {rule.min_size_gain_pct}%)"))
    lines = [f"{'pass' if ok else 'FAIL'}: {msg}" for _, ok, msg in checks]
    failed = [name for name, ok, _ in checks if not ok]
    if failed:
        reason = f"{winner.variant} does not beat the champion {champion.variant} on {', '.join(failed)}; champion kept"
    else:
        reason = f"{winner.variant} beats the champion {champion.variant} under the rule"
    return Decision(promote=not failed, reason=reason, rule=text, checks=lines, champion=champion.variant)
