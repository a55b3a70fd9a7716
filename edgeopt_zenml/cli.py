"""edgeopt command line: make a model smaller and faster in one command, or run the compression pipeline
on a config and show what it produced.

    edgeopt optimize model.onnx --data imgs/ --output out/   # your model: the best variant's files in out/
    edgeopt run -c configs/default.yaml            # a config run (from a checkout: python run.py run ...)
    edgeopt validate -c configs/my.yaml            # check a config in a second, run nothing
    edgeopt serve --deploy-root deploy/digits      # serve a deployed model (or -m models:/<name>@<alias>)
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional, Tuple

import click

from edgeopt import __version__
from edgeopt.env import configure_local_state
from edgeopt_zenml.cli_common import (  # noqa: F401 - EXIT_* are the command line's documented codes
    EXIT_BAD_INPUT,
    EXIT_GATE,
    EXIT_RUN_FAILED,
    Out,
    exit_now,
    json_option,
    load,
    prepare,
    run_reported,
    set_option,
)
from edgeopt_zenml.cli_optimize import optimize

configure_local_state()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="edgeopt", message="%(prog)s %(version)s")
def cli() -> None:
    """edgeopt: turn a trained image model into the best model an edge device can run.

    `edgeopt optimize MODEL --data DIR` takes your model as it is; a config run (`edgeopt run -c`) can
    also train a teacher and distill a student. Either way it prunes, quantizes and exports to ONNX and
    OpenVINO IR, measures every variant on the runtime it will run on, tracks them in MLflow, and keeps
    the Pareto-best one (promoted and deployed in a config run). Your ZenML (its active stack) and
    MLFLOW_TRACKING_URI are used when set; else state stays in .edgeopt/.
    """


cli.add_command(optimize)


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), default=Path("configs/default.yaml"),
              show_default=True, help="Run config (YAML); see docs/configuration.md.")
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
@click.option("--force", is_flag=True, help="Go on when the brought model scores near chance on the validation "
                                            "split (checks.near_chance: warn); by default the run is refused.")
@set_option
@json_option
def run(config: Path, no_cache: bool, run_name: str | None, zenml_config: Path | None, require_promotion: bool,
        report_dir: Path | None, verbose: bool, force: bool, overrides: Tuple[str, ...], as_json: bool) -> None:
    """Run the compression pipeline on CONFIG and print the variants and the winner."""
    out = Out(as_json)
    cfg = load(out, config, (*overrides, *(["checks.near_chance=warn"] if force else [])))
    prepared = prepare(out, cfg)  # every input, every target's agent, the brought model: before any step
    from edgeopt_zenml.api import summary_json
    from edgeopt_zenml.pipelines.runner import output

    t0 = time.perf_counter()
    summary, _ = run_reported(out, prepared.config, verbose, enable_cache=not no_cache, run_name=run_name,
                              zenml_config=str(zenml_config) if zenml_config else None)
    if report_dir:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "selection.md").write_text(output(summary["run"], "select", "selection_report"))
        shutil.copyfile(output(summary["run"], "select", "pareto_plot").png, report_dir / "pareto.png")
        out.say(f"report: {report_dir / 'selection.md'}, {report_dir / 'pareto.png'}")
    out.say(f"wall time {time.perf_counter() - t0:.1f} s")
    code = gate_exit_code(summary["selection"].winner, require_promotion)
    if code:
        reason = summary["promotion"].reason if summary["promotion"] is not None else summary["selection"].reason
        click.echo(f"edgeopt: quality gate failed: {reason}", err=True)
    out.result({"ok": code == 0, "exit_code": code, **summary_json(summary, prepared)})
    exit_now(code)


def gate_exit_code(winner: str | None, require_promotion: bool) -> int:
    """The quality gate: with ``--require-promotion``, 3 when no variant met the constraints; 0 when one
    did, whether it was promoted or the champion was kept (a winner that does not beat it passes)."""
    return EXIT_GATE if require_promotion and not winner else 0


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), default=Path("configs/default.yaml"),
              show_default=True, help="Run config (YAML).")
@set_option
@json_option
def validate(config: Path, overrides: Tuple[str, ...], as_json: bool) -> None:
    """Validate CONFIG and every input a run of it needs (data, a brought model, the tracking store, the
    deploy folder) and print the variants it would build."""
    out = Out(as_json)
    cfg = load(out, config, overrides, preflight=True)
    from edgeopt.plan.variants import variant_plan

    plan = variant_plan(cfg)
    names = plan.names()
    out.say(f"{config}: ok ({len(names)} variants of {', '.join(cfg.variants.bases)}; "
            f"reference {plan.reference_name})")
    for name in names:
        out.say(f"  {name}")
    for note in plan.notes:
        out.say(f"  note: {note}")
    out.result({"ok": True, "config": str(config), "bases": cfg.variants.bases, "variants": names,
                "reference": plan.reference_name, "notes": plan.notes, "tracking_uri": cfg.tracking_uri(),
                "deploy": {"enabled": cfg.deploy.enabled, "root": str(cfg.deploy_root())}})


@cli.command()
@click.option("--deploy-root", type=click.Path(path_type=Path), default=None,
              help="Deploy folder whose 'current' bundle is served (the config's deploy.root).")
@click.option("-m", "--model", "model_uri", default=None, metavar="models:/NAME@ALIAS",
              help="Serve a registered model's version instead: the one its alias names in the MLflow registry "
                   "(deployed into <state dir>/serve/ first). Give this or --deploy-root.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_envvar=True, default=None,
              help="The MLflow store of -m (default: the embedded one, <state dir>/mlflow.db).")
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
def serve(deploy_root: Optional[Path], model_uri: Optional[str], tracking_uri: Optional[str], host: str, port: int,
          token: str | None, max_body_bytes: int, max_batch: int, max_request_pixels: int, request_timeout: float,
          max_connections: int, ssl_certfile: Path | None, ssl_keyfile: Path | None, insecure: bool,
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
      edgeopt serve --deploy-root deploy/digits      # or: edgeopt serve -m models:/edgeopt-digits@champion
      curl -F file=@digit.png http://127.0.0.1:8000/predict
      EDGEOPT_SERVE_TOKEN=... edgeopt serve --deploy-root deploy/digits --host 0.0.0.0 \\
          --ssl-certfile cert.pem --ssl-keyfile key.pem
    """
    from edgeopt.serve import ServeError
    from edgeopt.serve.app import deploy_folder_for
    from edgeopt.serve.app import serve as run_server

    out = Out()
    if (deploy_root is None) == (model_uri is None):
        out.fail("serve: give the deploy folder to serve (--deploy-root DIR) or a registered model "
                 "(-m models:/<name>@<alias>), one of the two")
    try:
        if model_uri is not None:
            from edgeopt.config import state_dir

            deploy_root = deploy_folder_for(model_uri, tracking_uri or f"sqlite:///{state_dir() / 'mlflow.db'}",
                                            state_dir() / "serve")
        assert deploy_root is not None
        run_server(deploy_root, host=host, port=port, token=token, max_body_bytes=max_body_bytes,
                   max_batch=max_batch, max_request_pixels=max_request_pixels, request_timeout=request_timeout,
                   max_connections=max_connections, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                   insecure=insecure, access_log=access_log)
    except ServeError as err:
        out.fail(str(err))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def agent(ctx: click.Context) -> None:
    """Run the edge agent on this device: measure models for target devices (``--help`` for its options).

    The same as ``python -m edgeopt.agent``, which is what a device with only the agent's minimal
    install (infra/agent/requirements.txt, no torch, ZenML or MLflow) runs; docs/devices-agent.md.
    """
    from edgeopt.agent.server import main as agent_main

    agent_main(ctx.args)


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), default=Path("configs/default.yaml"),
              show_default=True, help="The run config whose deploy folder and registry to roll back.")
def rollback(config: Path) -> None:
    """Serve the bundle served before the current one again (following the deploy history), move the
    registry alias and the ZenML model stage back to its version, and block the model rolled away
    from: no later run promotes it until `edgeopt unblock` clears it."""
    out = Out()
    cfg = load(out, config)
    from mlflow.exceptions import MlflowException

    from edgeopt.deploy.bundle import DeployError
    from edgeopt.deploy.champion import rollback as _rollback
    from edgeopt_zenml.rollback import restore_stage

    try:
        done = _rollback(cfg.deploy_root(), uri=cfg.tracking_uri(), name=cfg.registry.name, alias=cfg.registry.alias)
    except (LookupError, ValueError, DeployError, TimeoutError, OSError, MlflowException) as err:
        out.fail(str(err).splitlines()[0] if str(err) else type(err).__name__, code=EXIT_RUN_FAILED)
    m = done.bundle.manifest
    stage = restore_stage(cfg.registry.name, m["version"], m["run_id"])
    click.echo(f"rolled back: {cfg.deploy_root() / 'current'} -> {done.bundle.path.name}; "
               f"{m['registered_model']}@{cfg.registry.alias} -> v{m['version']} ({m.get('variant')}); "
               + (f"ZenML model version {stage} -> production" if stage else "no ZenML model version to restore"))
    for skipped in done.skipped:
        click.echo(f"  skipped {skipped}")
    if done.blocked_sha256:
        click.echo(f"blocked: the model of v{done.from_version} (sha256 {done.blocked_sha256[:12]}) is not promoted "
                   f"again until `edgeopt unblock -c {config} --model {done.blocked_sha256[:12]}`")


@cli.command()
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), default=Path("configs/default.yaml"),
              show_default=True, help="The run config whose registered model to unblock.")
@click.option("--model", "which", default=None,
              help="The rolled-back model to allow again: its sha256 (8+ leading characters; rollback prints 12) "
                   "or a version (v3). Default: every blocked model.")
def unblock(config: Path, which: str | None) -> None:
    """Allow promotion of a model that a rollback blocked."""
    out = Out()
    cfg = load(out, config)
    from mlflow.exceptions import MlflowException

    from edgeopt.registry.lease import unblock as _unblock

    try:
        cleared = _unblock(cfg.tracking_uri(), cfg.registry.name, which)
    except (LookupError, MlflowException) as err:
        out.fail(str(err).splitlines()[0], code=EXIT_RUN_FAILED)
    click.echo(f"unblocked {len(cleared)} model(s) of {cfg.registry.name}: "
               + ", ".join(sha[:12] for sha in cleared))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
