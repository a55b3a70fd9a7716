"""What every ``edgeopt`` command shares: exit codes, the one-line error, ``--set``, ``--json`` output.

With ``--json`` a command's stdout is one JSON document and nothing else: what it says to a person (and
whatever a library prints while it runs) goes to stderr; a refused command prints
``{"ok": false, "error": "<the line>", "exit_code": n}`` besides its line on stderr.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import click

from edgeopt.config import ConfigError

# Exit codes (docs/operating.md, "Errors and exit codes"): 0 done; 1 the run failed (a step raised); 2 bad input,
# found before any step started; 3 the quality gate (--require-promotion; optimize: no variant met the
# constraints) failed.
EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_GATE = 1, 2, 3

set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Set a config field (dotted path, YAML value), e.g. --set target.threads=2 --set "
         "variants.quantization=[fp32,int8]; repeatable, applied after the file.")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout (the rest goes to stderr).")


class Out:
    """A command's output: lines for a person (stdout, or stderr under ``--json``), warnings, the final
    JSON document, and the one-line error that ends a refused command."""

    def __init__(self, as_json: bool = False):
        self.json = as_json
        self._saved: Optional[Tuple[int, int]] = None
        if as_json:
            self._saved = _stdout_to_stderr()

    def say(self, line: str = "") -> None:
        click.echo(line, err=self.json)

    def warn(self, line: str) -> None:
        click.echo(f"edgeopt: warning: {line}", err=True)

    def result(self, doc: Dict[str, Any]) -> None:
        """The command's JSON document on the real stdout (only under ``--json``)."""
        if not self.json:
            return
        self._restore()
        click.echo(json.dumps(doc, default=str))

    def fail(self, msg: Any, code: int = EXIT_BAD_INPUT) -> None:
        """One line on stderr, the last the command writes, then exit with ``code``."""
        line = " ".join(str(msg).split()) or "failed"
        self.result({"ok": False, "error": line, "exit_code": code})
        click.echo(f"edgeopt: error: {line[:600]}", err=True)
        sys.exit(code)

    def _restore(self) -> None:
        if self._saved is not None:
            sys.stdout.flush()
            fd, saved = self._saved
            os.dup2(saved, fd)
            os.close(saved)
            self._saved = None


def _stdout_to_stderr() -> Optional[Tuple[int, int]]:
    """Point the process's stdout at stderr (what C libraries print too); (fd, saved copy), or None where the
    streams are not files (click's test runner)."""
    try:
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    sys.stdout.flush()
    saved = os.dup(fd)
    os.dup2(err, fd)
    return fd, saved


def load(out: Out, config: Path, overrides: Sequence[str] = (), preflight: bool = False):
    """The validated config (``--set`` applied); with ``preflight``, also every input the run depends on
    (data and its images, a brought model, the tracking store, the deploy folder), before any step starts."""
    from edgeopt.plan import load_config
    from edgeopt_zenml.api import check_tracking_env

    try:
        cfg = load_config(config, overrides)
        check_tracking_env(cfg)
    except ConfigError as err:
        out.fail(str(err))
    if preflight:
        from edgeopt.plan.preflight import PREFLIGHT_ERRORS, check_run_inputs

        try:
            check_run_inputs(cfg)
        except PREFLIGHT_ERRORS as err:
            out.fail(str(err))
    return cfg


def exit_now(code: int) -> None:
    """Everything is written and committed (ZenML store, MLflow, deploy folder): run the exit
    hooks, then skip the interpreter's module teardown, which takes ~4 s with torch, OpenVINO
    and ZenML loaded and does nothing useful."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def prepare(out: Out, cfg):
    """Everything checked before any step starts (edgeopt_zenml.api.prepare_run), each problem the command's
    one-line error; says what was found and decided: devices reached, the brought model's normalization and
    class order, and what looks wrong (warnings, on stderr)."""
    from edgeopt.agent.client import AgentError
    from edgeopt.plan.preflight import PREFLIGHT_ERRORS
    from edgeopt.plan.reference import ReferenceError
    from edgeopt_zenml.api import prepare_run

    try:
        prepared, lines = prepare_run(cfg)
    except (*PREFLIGHT_ERRORS, AgentError, ReferenceError, ConfigError) as err:
        out.fail(str(err))
    for line in [*lines, *prepared.notes]:
        out.say(line)
    for w in prepared.warnings:
        out.warn(w)
    return prepared


def run_reported(out: Out, cfg, verbose: bool, after: Optional[Callable[[Dict[str, Any]], Any]] = None,
                 **options: Any) -> Tuple[Dict[str, Any], Any]:
    """Run the pipeline (``options``: run_pipeline's) and ``after(summary)``; a failure is the command's last
    line (exit 1, the log with the traceback named); then print the notes, the variants table and the headline."""
    from edgeopt.logs import route_library_logs
    from edgeopt_zenml.pipelines.runner import RunFailed, run_pipeline

    route_library_logs(verbose=verbose)
    try:
        summary = run_pipeline(cfg, **options)
        extra = after(summary) if after is not None else None
    except RunFailed as err:
        click.echo(f"edgeopt: the run failed; its log, with the traceback: {err.log_path}", err=True)
        out.fail(str(err), code=EXIT_RUN_FAILED)
    except Exception as err:  # noqa: BLE001 - gathering or writing the run's outputs failed: one line for the user
        out.fail(f"{type(err).__name__}: {err}", code=EXIT_RUN_FAILED)
    for line in [*summary["notes"], "", summary["table"], "", summary["headline"]]:
        out.say(line)
    return summary, extra
