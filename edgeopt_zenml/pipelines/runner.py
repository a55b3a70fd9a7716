"""Run the compress pipeline for a validated config and gather what it produced."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from zenml import Model
from zenml.client import Client
from zenml.enums import ExecutionStatus
from zenml.logger import ZenMLConsoleHandler
from zenml.utils import source_utils

from edgeopt.artifacts import ModelArtifact, workdir_scope
from edgeopt.config import FROM_CHECKOUT, PROJECT_ROOT, RunConfig, state_dir
from edgeopt.env import zenml_store_text
from edgeopt.plan import variant_plan
from edgeopt.select.report import variants_table
from edgeopt.track.uri import split_credentials, without_credentials
from edgeopt_zenml.pipelines.compress import compress

MAX_MESSAGE_CHARS = 400


class RunFailed(RuntimeError):
    """The pipeline run failed: ``str()`` is one line (the failed step and its own error); the
    tracebacks are in ``log_path``."""

    def __init__(self, message: str, log_path: Path):
        super().__init__(message)
        self.log_path = log_path


def use_checkout_as_source_root() -> None:
    """From a checkout, steps and materializers resolve from it, whatever the working directory.
    Installed, ZenML's own rule stands: edgeopt's steps resolve as an installed package's code and
    the user's project keeps its source root (its .zen repository, or the working directory)."""
    if FROM_CHECKOUT:
        source_utils.set_custom_source_root(str(PROJECT_ROOT))


def output(run, step: str, name: str):
    return run.steps[step].outputs[name][0].load()


def log_path_for(run_name: str) -> Path:
    """Where a run's log (every record, tracebacks included) is written: ``<state dir>/logs/<run>.log``."""
    folder = state_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{run_name}.log"


class _WithoutTraceback(logging.Formatter):
    """The console's formatter, minus tracebacks (they go to the run's log file)."""

    def __init__(self, inner: Optional[logging.Formatter]):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Every log record of the run goes to ``path`` in full; ZenML's console shows them without tracebacks."""
    root = logging.getLogger()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    consoles: List[Tuple[logging.Handler, Optional[logging.Formatter]]] = [
        (h, h.formatter) for h in root.handlers if isinstance(h, ZenMLConsoleHandler)]
    for handler, formatter in consoles:
        handler.setFormatter(_WithoutTraceback(formatter))
    root.addHandler(to_file)
    try:
        yield
    finally:
        root.removeHandler(to_file)
        to_file.close()
        for handler, formatter in consoles:
            handler.setFormatter(formatter)


def failed_step(run_name: str) -> Optional[Tuple[str, str, str]]:
    """(step, one-line error, traceback) of the run's first failed step, from ZenML's store; None if none failed."""
    try:
        run = Client().get_pipeline_run(run_name)
    except KeyError:
        return None
    failed = sorted((r for r in run.steps.values() if r.status == ExecutionStatus.FAILED),
                    key=lambda r: (r.start_time is None, r.start_time))
    if not failed:
        return None
    info = failed[0].exception_info
    if info is None:
        return failed[0].name, "failed (no exception recorded; see the step's logs)", ""
    message = (info.message or "").strip().splitlines()[0] if (info.message or "").strip() else ""
    kind = (info.source or "").rsplit(".", 1)[-1] or "Error"
    ours = (info.source or "").startswith("edgeopt.")  # edgeopt's errors are phrased for the user already
    text = message if ours and message else f"{kind}: {message}" if message else kind
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return failed[0].name, text, info.traceback


def stack_tracking(cfg: RunConfig) -> Tuple[RunConfig, Optional[str]]:
    """Where the run logs to MLflow: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else the active stack's
    MLflow experiment tracker (its URI, its credentials in the environment as ZenML's own steps get them),
    else the embedded store. Returns the config with that URI set when it came from the stack, and a note."""
    if cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return cfg, None
    try:
        tracker = Client().active_stack.experiment_tracker
    except Exception as err:  # noqa: BLE001 - a stack component whose flavor cannot load: say so, log locally
        return cfg, f"the active stack's components cannot be loaded ({type(err).__name__}); MLflow: {cfg.tracking_uri()}"
    if tracker is None:
        return cfg, None
    if tracker.flavor != "mlflow":
        return cfg, (f"the stack's experiment tracker '{tracker.name}' is {tracker.flavor}, not MLflow (edgeopt's runs, "
                     f"registry and promotion are MLflow's): logging to {cfg.tracking_uri()}")
    mlflow_tracker: Any = tracker  # an MLFlowExperimentTracker (zenml.integrations.mlflow)
    uri = mlflow_tracker.get_tracking_uri()
    if not uri or uri.startswith("file:") or "://" not in uri:
        return cfg, (f"the stack's MLflow tracker '{tracker.name}' keeps a local file store, which MLflow 3 refuses: "
                     f"logging to {cfg.tracking_uri()}")
    mlflow_tracker.configure_mlflow()  # its username/password/token into the environment, for MLflow's client
    note = f"MLflow: the active stack's experiment tracker '{tracker.name}' ({split_credentials(uri)[0]})"
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})}), note


def winner_model(run, cfg: RunConfig, winner: str) -> ModelArtifact:
    """The model folder of a variant (``<name>@<runtime>``) of a finished run, from the step that built it."""
    name = winner.split("@", 1)[0]
    build = next(b for b in variant_plan(cfg).builds if b.name == name)
    return output(run, build.export_id if build.precision == "fp32" else build.quantize_id, "model")


def run_pipeline(cfg: RunConfig, *, enable_cache: bool = True, run_name: Optional[str] = None,
                 zenml_config: Optional[str] = None) -> Dict[str, Any]:
    """``zenml_config``: a ZenML run-config YAML (step settings, Docker, resources), e.g.
    infra/kubeflow/run_config.yaml; what this function sets (run name, cache, model) wins.

    A failed run raises :class:`RunFailed` naming the first failed step and its own error; the log
    file it names has every traceback. The steps' work folders are removed when the run ends. With
    ``deploy.enabled: false`` nothing is promoted or deployed (``promotion`` and ``bundle`` are None).
    """
    use_checkout_as_source_root()
    cfg, tracking_note = stack_tracking(cfg)
    cfg, credentials = without_credentials(cfg)  # in the environment, not in the pipeline's parameters
    os.environ.update(credentials)
    name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    model = Model(name=cfg.registry.name, description="edgeopt: Pareto-best edge model", tags=["edgeopt"])
    p = compress.with_options(run_name=name, enable_cache=enable_cache, model=model, config_path=zenml_config)
    log_path = log_path_for(name)
    error: Optional[BaseException] = None
    with run_log(log_path), workdir_scope():
        try:
            run = Client().get_pipeline_run(p(config=cfg.model_dump(mode="json")).id)
        except Exception as err:  # noqa: BLE001 - reported below from the failed step's own record
            error = err
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"pipeline run {name} raised:\n{traceback.format_exc()}\n")
    if error is not None or run.status != ExecutionStatus.COMPLETED:
        step = failed_step(name)
        if step is None:
            detail = f"{type(error).__name__}: {error}" if error else f"ended {run.status.value}"
            raise RunFailed(f"pipeline run {name}: {detail.splitlines()[0][:MAX_MESSAGE_CHARS]}", log_path) from error
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"step {step[0]} failed:\n{step[2]}\n")
        raise RunFailed(f"{step[0]}: {step[1]}", log_path) from None
    ev, sel = output(run, "evaluate", "evaluation"), output(run, "select", "selection")
    promotion, bundle = (output(run, "promote", "promotion"), output(run, "deploy", "bundle")) if cfg.deploy.enabled \
        else (None, None)
    if sel.winner and (promotion is None or promotion.promoted):
        m = promotion.metrics if promotion is not None else ev.result(sel.winner).metrics
        where = (f"-> {promotion.registered_model} v{promotion.version} (alias '{promotion.alias}'), deployed to {bundle}"
                 if promotion is not None else "(export only: nothing promoted or deployed)")
        headline = (
            f"winner: {sel.winner} {where}\n"
            f"  test accuracy {100 * m['test_accuracy']:.2f} %, test drop {m['test_accuracy_drop']:.2f} pt "
            f"(chosen on validation: val accuracy {100 * m['accuracy']:.2f} %, val drop {m['accuracy_drop']:.2f} pt; "
            f"test figures reported, never used to choose)\n"
            f"  vs the reference {ev.reference.variant} (FP32, measured in the same loop; test accuracy "
            f"{100 * ev.reference.test_accuracy:.2f} %): {m['compression_ratio']:.1f}x smaller, "
            f"{m['speedup_vs_reference']:.2f}x lower p50 (noise ±{m['latency_noise_pct']:.1f} %)"
        )
    elif promotion is None:
        headline = f"no winner: {sel.reason}"
    else:
        headline = f"no promotion: {promotion.reason}" + (f"\n  deployed (unchanged): {bundle}" if bundle else "")
    cached = sorted(s for s, r in run.steps.items() if r.status == ExecutionStatus.CACHED)
    return {"run": run, "evaluation": ev, "selection": sel, "promotion": promotion, "bundle": bundle,
            "cached_steps": cached, "table": variants_table(ev, sel), "headline": headline,
            "tracking_uri": split_credentials(cfg.tracking_uri())[0],
            "notes": [zenml_store_text(), *([tracking_note] if tracking_note else [])]}
