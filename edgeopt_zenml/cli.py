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

from edgeopt.config import ConfigError, load_config
from edgeopt.env import configure_local_state

configure_local_state()


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"edgeopt: error: {msg}", err=True)
    sys.exit(code)


def _load(config: Path, preflight: bool = False):
    """The validated config; with ``preflight``, also refuse a brought model edgeopt cannot take, before any work."""
    try:
        cfg = load_config(config)
    except ConfigError as err:
        _fail(str(err))
    if preflight:
        from edgeopt.pretrained import PretrainedError
        from edgeopt.pretrained import preflight as check_brought_model

        try:
            check_brought_model(cfg.teacher.onnx, cfg.data)
        except PretrainedError as err:
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
def run(config: Path, no_cache: bool, run_name: str | None, zenml_config: Path | None, require_promotion: bool,
        report_dir: Path | None) -> None:
    """Run the compression pipeline on CONFIG and print the variants and the winner."""
    cfg = _load(config, preflight=True)
    from edgeopt_zenml.pipelines.runner import output, run_pipeline

    t0 = time.perf_counter()
    try:
        summary = run_pipeline(cfg, enable_cache=not no_cache, run_name=run_name,
                               zenml_config=str(zenml_config) if zenml_config else None)
    except Exception as err:  # noqa: BLE001 - one line for the user; ZenML's log above has the details
        _fail(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", code=1)
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
    if require_promotion and not summary["selection"].winner:
        click.echo(f"edgeopt: quality gate failed: {summary['promotion'].reason}", err=True)
        _exit_now(3)
    _exit_now(0)


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
    """Validate CONFIG (and a brought ONNX model) and print the variants it would build."""
    cfg = _load(config, preflight=True)
    from edgeopt.plan import variant_plan

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
              help="Address to bind. Anything but loopback (127.0.0.1, ::1, localhost) needs a token.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--token", envvar="EDGEOPT_SERVE_TOKEN", show_envvar=True, default=None,
              help="Bearer token (16+ characters) required on every endpoint (/health without it: the status "
                   "only). Prefer the environment variable: an option is visible in the process list.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=8 * 1024 * 1024, show_default=True,
              help="Largest request body accepted (413 above it).")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most items (tensor rows or image files) in one /predict request.")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="Log every request.")
def serve(deploy_root: Path, host: str, port: int, token: str | None, max_body_bytes: int, max_batch: int,
          access_log: bool) -> None:
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
    """
    from edgeopt.serving import ServeError
    from edgeopt.serving import serve as run_server

    try:
        run_server(deploy_root, host=host, port=port, token=token, max_body_bytes=max_body_bytes,
                   max_batch=max_batch, access_log=access_log)
    except ServeError as err:
        _fail(str(err))


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), default=Path("configs/default.yaml"),
              show_default=True, help="The run config whose deploy folder and registry to roll back.")
def rollback(config: Path) -> None:
    """Serve the previously deployed bundle again and move the registry alias back to its version."""
    cfg = _load(config)
    from edgeopt.deploy import rollback as _rollback

    try:
        bundle = _rollback(cfg.deploy_root(), uri=cfg.tracking_uri(), alias=cfg.registry.alias)
    except (LookupError, ValueError) as err:
        _fail(str(err), code=1)
    m = bundle.manifest
    click.echo(f"rolled back: {cfg.deploy_root() / 'current'} -> {bundle.path.name}; "
               f"{m['registered_model']}@{cfg.registry.alias} -> v{m['version']} ({m['variant']})")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
