"""Helpers shared by the benchmarks in this folder (run them as ``.venv/bin/python bench/<name>.py``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUIET_ENV = {
    "ZENML_ANALYTICS_OPT_IN": "false",
    "ZENML_ENABLE_RICH_TRACEBACK": "false",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
    "TQDM_DISABLE": "1",
}


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help shows the benchmark's whole docstring (what it measures, commands, goal)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def quiet() -> None:
    """No telemetry, no progress bars, no library warnings or log lines: the benchmark's own lines stay
    readable (what a pipeline run prints is kept out with :func:`silenced`)."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("nncf", "torch", "onnxruntime", "openvino"):
        logging.getLogger(name).setLevel(logging.ERROR)


def isolated_state(prefix: str) -> Path:
    """A fresh temporary folder for everything a pipeline run writes, so that the user's ``.edgeopt``
    state and ``deploy/`` are not touched: ZenML's store (ZENML_CONFIG_PATH, set here, so call this
    before importing zenml), and every work dir made with ``tempfile`` in this process (edgeopt's
    artifacts). Pass it to :func:`pipeline_config` for the MLflow store and the deploy folder."""
    state = Path(tempfile.mkdtemp(prefix=prefix))
    (state / "tmp").mkdir()
    os.environ["ZENML_CONFIG_PATH"] = str(state / "zenml")
    tempfile.tempdir = str(state / "tmp")
    return state


def run_isolated(args: argparse.Namespace, prefix: str, compare) -> int:
    """``compare(args, state)`` in a fresh :func:`isolated_state`, removed afterwards unless
    ``args.keep_state``."""
    quiet()
    state = isolated_state(prefix)
    try:
        return compare(args, state)
    finally:
        if args.keep_state:
            print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)


def pipeline_config(raw: Dict[str, Any], state: Path, tag: str, source: str):
    """``raw`` with tracking.uri (SQLite), deploy.root and registry.name redirected into ``state``."""
    from edgeopt.plan import parse_config

    return parse_config({
        **raw,
        "tracking": {**raw.get("tracking", {}), "uri": f"sqlite:///{state / f'mlflow-{tag}.db'}"},
        "deploy": {**raw.get("deploy", {}), "root": str(state / f"deploy-{tag}")},
        "registry": {**raw.get("registry", {}), "name": f"bench-{tag}"},
    }, source)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Send everything the block writes to stdout/stderr (progress bars, step logs, C++ runtime
    warnings: the file descriptors themselves) to a scratch file; show its tail only if the block fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 1)
        os.dup2(scratch.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:
                scratch.seek(0)
                sys.stderr.write(scratch.read().decode(errors="replace")[-20000:])


def fingerprint_line(fp: Dict[str, object]) -> str:
    isa = ",".join(fp["isa"]) or "none of the INT8/BF16 ones"
    return (f"CPU {fp['cpu']} ({fp['machine']}, {fp['cores']} cores, ISA {isa}); onnxruntime {fp['onnxruntime']}, "
            f"openvino {fp['openvino']}, torch {fp['torch']}; fingerprint {fp['id']}")


def load_line(when: str) -> str:
    """The machine's load averages: on a shared machine they say how much else was running."""
    one, five, _ = os.getloadavg()
    return f"load average {when}: {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """Run-to-run spread: (max - min) / median, as a fraction."""
    return (max(values) - min(values)) / median(values)


def span(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median [min-max]`` of repeated measurements."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"
