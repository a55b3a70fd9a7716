"""edgeopt command line: run the compression pipeline on a config and show what it produced.

    python run.py run -c configs/default.yaml      # or: edgeopt run -c ...
    python run.py validate -c configs/my.yaml      # check a config in a second, run nothing
"""

from __future__ import annotations

import atexit
import os
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


def _load(config: Path):
    try:
        return load_config(config)
    except ConfigError as err:
        _fail(str(err))


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
def run(config: Path, no_cache: bool, run_name: str | None) -> None:
    """Run the compression pipeline on CONFIG and print the variants and the winner."""
    cfg = _load(config)
    from pipelines.runner import run_pipeline

    t0 = time.perf_counter()
    try:
        summary = run_pipeline(cfg, enable_cache=not no_cache, run_name=run_name)
    except Exception as err:  # noqa: BLE001 - one line for the user; ZenML's log above has the details
        _fail(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", code=1)
    click.echo("")
    click.echo(summary["table"])
    click.echo("")
    click.echo(summary["headline"])
    click.echo(f"wall time {time.perf_counter() - t0:.1f} s")
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
    """Validate CONFIG against the schema and print the variants it would build."""
    cfg = _load(config)
    combos = cfg.variants.combinations()
    click.echo(f"{config}: ok ({len(combos)} student variants + the teacher baseline)")
    for ratio, fmt, scheme, runtime in combos:
        click.echo(f"  prune {ratio:.2f}  {scheme:5} {fmt:9} on {runtime}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
