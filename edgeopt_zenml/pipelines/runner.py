"""Run the compress pipeline for a validated config and gather what it produced."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from zenml import Model
from zenml.client import Client
from zenml.enums import ExecutionStatus
from zenml.utils import source_utils

from edgeopt.config import PROJECT_ROOT, RunConfig
from edgeopt.report import variants_table
from edgeopt_zenml.pipelines.compress import compress


def use_checkout_as_source_root() -> None:
    """Steps and materializers resolve from the checkout, whatever the working directory."""
    source_utils.set_custom_source_root(str(PROJECT_ROOT))


def output(run, step: str, name: str):
    return run.steps[step].outputs[name][0].load()


def run_pipeline(cfg: RunConfig, *, enable_cache: bool = True, run_name: Optional[str] = None,
                 zenml_config: Optional[str] = None) -> Dict[str, Any]:
    """``zenml_config``: a ZenML run-config YAML (step settings, Docker, resources), e.g.
    infra/kubeflow/run_config.yaml; what this function sets (run name, cache, model) wins."""
    use_checkout_as_source_root()
    name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    model = Model(name=cfg.registry.name, description="edgeopt: Pareto-best edge model", tags=["edgeopt"])
    p = compress.with_options(run_name=name, enable_cache=enable_cache, model=model, config_path=zenml_config)
    run = Client().get_pipeline_run(p(config=cfg.model_dump(mode="json")).id)
    if run.status != ExecutionStatus.COMPLETED:
        failed = [s for s, r in run.steps.items() if r.status == ExecutionStatus.FAILED]
        raise RuntimeError(f"pipeline run {name} ended {run.status.value}; failed steps: {failed or 'none'}")
    ev, sel = output(run, "evaluate", "evaluation"), output(run, "select", "selection")
    promotion, bundle = output(run, "promote", "promotion"), output(run, "deploy", "bundle")
    if promotion.promoted:
        m = promotion.metrics
        headline = (
            f"winner: {sel.winner} -> {promotion.registered_model} v{promotion.version} "
            f"(alias '{promotion.alias}'), deployed to {bundle}\n"
            f"  vs the reference {ev.reference.variant} (the teacher in FP32, measured in the same loop): "
            f"accuracy drop {m['accuracy_drop']:.2f} pt, {m['compression_ratio']:.1f}x smaller, "
            f"{m['speedup_vs_reference']:.2f}x lower p50 (noise ±{m['latency_noise_pct']:.1f} %)"
        )
    else:
        headline = f"no promotion: {promotion.reason}" + (f"\n  deployed (unchanged): {bundle}" if bundle else "")
    cached = sorted(s for s, r in run.steps.items() if r.status == ExecutionStatus.CACHED)
    return {"run": run, "evaluation": ev, "selection": sel, "promotion": promotion, "bundle": bundle,
            "cached_steps": cached, "table": variants_table(ev, sel), "headline": headline}
