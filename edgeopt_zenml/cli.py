"""edgeopt command line: run the compression pipeline on a config and show what it produced.

    python run.py run -c configs/default.yaml      # or: edgeopt run -c ...
    python run.py validate -c configs/my.yaml      # check a config in a second, run nothing
    python run.py serve --deploy-root deploy/digits   # serve the deployed model on 127.0.0.1:8000
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import time
from pathlib import Path

import click

from edgeopt.config import ConfigError
from edgeopt.env import configure_local_state
from edgeopt.plan import load_config

configure_local_state()


# Exit codes (README, "Errors and exit codes"): 0 done; 1 the run failed (a step raised); 2 bad input,
# found before any step started; 3 the quality gate (--require-promotion) failed.
EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_GATE = 1, 2, 3


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr, the last the command writes, then exit with ``code``."""
    line = " ".join(str(msg).split()) or "failed"
    click.echo(f"edgeopt: error: {line[:600]}", err=True)
    sys.exit(code)


def _load(config: Path, preflight: bool = False):
    """The validated config; with ``preflight``, also every input the run depends on (data and its
    images, a brought model, the tracking store, the deploy folder), before any step starts."""
    try:
        cfg = load_config(config)
    except ConfigError as err:
        _fail(str(err))
    if preflight:
        from edgeopt.plan.preflight import PREFLIGHT_ERRORS, check_run_inputs

        try:
            check_run_inputs(cfg)
        except PREFLIGHT_ERRORS as err:
            _fail(str(err))
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """edgeopt: turn a trained image model into the best model an edge device can run.

    Trains (or loads) a teacher, distills a student, prunes, quantizes and exports it to ONNX and
    OpenVINO IR, measures every variant on the runtime it will run on, tracks them in MLflow, and
    promotes and deploys the Pareto-best one. State stays inside the checkout (.edgeopt/, .zen/).
    """


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), default=Path("configs/default.yaml"),
              show_default=True, help="Run config (YAML); see README 'Configuration'.")
@click.option("--no-cache", is_flag=True, help="Re-run every step, even those whose inputs did not change.")
@click.option("--run-name", default=None, help="ZenML run name (default: <config name>-<timestamp>).")
@click.option("--zenml-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="ZenML run config (YAML) with step settings (Docker, resources) for a remote stack, "
                   "e.g. infra/kubeflow/run_config.yaml.")
@click.option("--require-promotion", is_flag=True,
              help="Quality gate: exit 3 when no variant met the target's constraints. A winner that "
                   "does not beat the current champion keeps the champion and passes.")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the selection report (selection.md) and the Pareto plot (pareto.png) here.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show the libraries' own log lines (ONNX export passes, NNCF, MLflow, warnings) here too; "
                   "by default they go to the run's log file only (<state dir>/logs/<run>.log).")
def run(config: Path, no_cache: bool, run_name: str | None, zenml_config: Path | None, require_promotion: bool,
        report_dir: Path | None, verbose: bool) -> None:
    """Run the compression pipeline on CONFIG and print the variants and the winner."""
    cfg = _load(config, preflight=True)
    if cfg.targets:  # every target's agent answers and takes its token, before any training
        from edgeopt.agent.client import AgentError
        from edgeopt.agent.targets import preflight_targets

        try:
            for d, info in zip(cfg.targets, preflight_targets(cfg.targets)):
                fp = info["fingerprint"]
                click.echo(f"target {d.label}: {fp['cpu']} ({fp['cores']} cores), runtimes "
                           f"{', '.join(info['runtimes'])}, fingerprint {fp['id']}")
        except AgentError as err:
            _fail(str(err))
    from edgeopt.logs import route_library_logs
    from edgeopt_zenml.pipelines.runner import RunFailed, output, run_pipeline

    route_library_logs(verbose=verbose)
    t0 = time.perf_counter()
    try:
        summary = run_pipeline(cfg, enable_cache=not no_cache, run_name=run_name,
                               zenml_config=str(zenml_config) if zenml_config else None)
    except RunFailed as err:
        click.echo(f"edgeopt: the run failed; its log, with the traceback: {err.log_path}", err=True)
        _fail(str(err), code=EXIT_RUN_FAILED)
    except Exception as err:  # noqa: BLE001 - gathering the run's outputs failed: one line for the user
        _fail(f"{type(err).__name__}: {err}", code=EXIT_RUN_FAILED)
    click.echo("")
    click.echo(summary["table"])
    click.echo("")
    click.echo(summary["headline"])
    if report_dir:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "selection.md").write_text(output(summary["run"], "select", "selection_report"))
        shutil.copyfile(output(summary["run"], "select", "pareto_plot").png, report_dir / "pareto.png")
        click.echo(f"report: {report_dir / 'selection.md'}, {report_dir / 'pareto.png'}")
    click.echo(f"wall time {time.perf_counter() - t0:.1f} s")
    code = gate_exit_code(summary["selection"].winner, require_promotion)
    if code:
        click.echo(f"edgeopt: quality gate failed: {summary['promotion'].reason}", err=True)
    _exit_now(code)


def gate_exit_code(winner: str | None, require_promotion: bool) -> int:
    """The quality gate: with ``--require-promotion``, 3 when no variant met the constraints; 0 when one
    did, whether it was promoted or the champion was kept (a winner that does not beat it passes)."""
    return EXIT_GATE if require_promotion and not winner else 0


def _exit_now(code: int) -> None:
    """Everything is written and committed (ZenML store, MLflow, deploy folder): run the exit
    hooks, then skip the interpreter's module teardown, which takes ~4 s with torch, OpenVINO
    and ZenML loaded and does nothing useful."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), required=True, help="Run config (YAML).")
def validate(config: Path) -> None:
    """Validate CONFIG and every input a run of it needs (data, a brought model, the tracking store, the
    deploy folder) and print the variants it would build."""
    cfg = _load(config, preflight=True)
    from edgeopt.plan.variants import variant_plan

    plan = variant_plan(cfg)
    names = plan.names()
    click.echo(f"{config}: ok ({len(names)} variants of {', '.join(cfg.variants.bases)}; "
               f"reference {plan.reference_name})")
    for name in names:
        click.echo(f"  {name}")
    for note in plan.notes:
        click.echo(f"  note: {note}")


@cli.command()
@click.option("--deploy-root", type=click.Path(path_type=Path), default=Path("deploy/digits"), show_default=True,
              help="Deploy folder whose 'current' bundle is served (the config's deploy.root).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (IPv6 with or without brackets). Anything but loopback (127.0.0.1, ::1, "
                   "localhost) needs a token, and TLS or --insecure; on loopback, requests must name a loopback "
                   "Host (DNS rebinding).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--token", envvar="EDGEOPT_SERVE_TOKEN", show_envvar=True, default=None,
              help="Bearer token (16+ printable ASCII characters) required on every endpoint (/health without it: the status "
                   "only). Prefer the environment variable: an option is visible in the process list.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=8 * 1024 * 1024, show_default=True,
              help="Largest request body accepted (413 above it).")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most items (tensor rows or image files) in one /predict request.")
@click.option("--max-request-pixels", type=click.IntRange(min=1), default=2 * 4096 * 4096, show_default=True,
              help="Most pixels of all the images in one request together, read from their headers before "
                   "any is decoded (413 above it; one image may have 4096x4096).")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds a client has to send a whole request (headers and body); slower ones are cut off.")
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Connections and requests in flight at once (uvicorn's limit_concurrency); 503 beyond.")
@click.option("--ssl-certfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Serve HTTPS with this certificate (PEM); needed to send a token beyond loopback.")
@click.option("--ssl-keyfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The certificate's private key (PEM), unless it is in --ssl-certfile.")
@click.option("--insecure", is_flag=True,
              help="Allow a token over plain HTTP beyond loopback (only behind a TLS proxy you trust).")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="Log every request.")
def serve(deploy_root: Path, host: str, port: int, token: str | None, max_body_bytes: int, max_batch: int,
          max_request_pixels: int, request_timeout: float, max_connections: int, ssl_certfile: Path | None,
          ssl_keyfile: Path | None, insecure: bool, access_log: bool) -> None:
    """Serve the deployed model over HTTP (FastAPI + uvicorn) until Ctrl-C.

    \b
    GET  /health     status and the bundle being served (the status alone without the token)
    GET  /metadata   version, variant, metrics, manifest, labels
    POST /predict    an image as multipart field 'file' (repeatable), or JSON
                     {"inputs": [...]}: a normalized tensor [N,C,H,W] or [C,H,W];
                     answers the top label, its index and the softmax probabilities

    A new deployment (the 'current' link switched) is loaded, verified and swapped in while the
    server runs; a broken one is reported in /health and the old bundle goes on serving.

    \b
    Example:
      python run.py serve --deploy-root deploy/digits
      curl -F file=@digit.png http://127.0.0.1:8000/predict
      EDGEOPT_SERVE_TOKEN=... python run.py serve --host 0.0.0.0 \\
          --ssl-certfile cert.pem --ssl-keyfile key.pem
    """
    from edgeopt.serve import ServeError
    from edgeopt.serve.app import serve as run_server

    try:
        run_server(deploy_root, host=host, port=port, token=token, max_body_bytes=max_body_bytes,
                   max_batch=max_batch, max_request_pixels=max_request_pixels, request_timeout=request_timeout,
                   max_connections=max_connections, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                   insecure=insecure, access_log=access_log)
    except ServeError as err:
        _fail(str(err))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def agent(ctx: click.Context) -> None:
    """Run the edge agent on this device: measure models for target devices (``--help`` for its options).

    The same as ``python -m edgeopt.agent``, which is what a device with only the agent's minimal
    install (infra/agent/requirements.txt, no torch, ZenML or MLflow) runs; README 'Devices'.
    """
    from edgeopt.agent.server import main as agent_main

    agent_main(ctx.args)


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), default=Path("configs/default.yaml"),
              show_default=True, help="The run config whose deploy folder and registry to roll back.")
def rollback(config: Path) -> None:
    """Serve the bundle served before the current one again (following the deploy history), move the
    registry alias and the ZenML model stage back to its version, and block the model rolled away
    from: no later run promotes it until `run.py unblock` clears it."""
    cfg = _load(config)
    from mlflow.exceptions import MlflowException

    from edgeopt.deploy.bundle import DeployError
    from edgeopt.deploy.champion import rollback as _rollback
    from edgeopt_zenml.rollback import restore_stage

    try:
        done = _rollback(cfg.deploy_root(), uri=cfg.tracking_uri(), name=cfg.registry.name, alias=cfg.registry.alias)
    except (LookupError, ValueError, DeployError, TimeoutError, OSError, MlflowException) as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__, code=EXIT_RUN_FAILED)
    m = done.bundle.manifest
    stage = restore_stage(cfg.registry.name, m["version"], m["run_id"])
    click.echo(f"rolled back: {cfg.deploy_root() / 'current'} -> {done.bundle.path.name}; "
               f"{m['registered_model']}@{cfg.registry.alias} -> v{m['version']} ({m.get('variant')}); "
               + (f"ZenML model version {stage} -> production" if stage else "no ZenML model version to restore"))
    for skipped in done.skipped:
        click.echo(f"  skipped {skipped}")
    if done.blocked_sha256:
        click.echo(f"blocked: the model of v{done.from_version} (sha256 {done.blocked_sha256[:12]}) is not promoted "
                   f"again until `python run.py unblock -c {config} --model {done.blocked_sha256[:12]}`")


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), default=Path("configs/default.yaml"),
              show_default=True, help="The run config whose registered model to unblock.")
@click.option("--model", "which", default=None,
              help="The rolled-back model to allow again: its sha256 (8+ leading characters; rollback prints 12) "
                   "or a version (v3). Default: every blocked model.")
def unblock(config: Path, which: str | None) -> None:
    """Allow promotion of a model that a rollback blocked."""
    cfg = _load(config)
    from mlflow.exceptions import MlflowException

    from edgeopt.registry.lease import unblock as _unblock

    try:
        cleared = _unblock(cfg.tracking_uri(), cfg.registry.name, which)
    except (LookupError, MlflowException) as err:
        _fail(str(err).splitlines()[0], code=EXIT_RUN_FAILED)
    click.echo(f"unblocked {len(cleared)} model(s) of {cfg.registry.name}: "
               + ", ".join(sha[:12] for sha in cleared))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
