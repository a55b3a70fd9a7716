"""Library chatter off the terminal: the console keeps edgeopt's and ZenML's own lines, while the
INFO lines of the libraries underneath (about 40 per exported model from the ONNX exporter's
optimizer passes, NNCF's, MLflow's store set-up, torch's and Python's warnings) still reach every
other handler, such as the run's log file (``<state dir>/logs/<run>.log``).

    route_library_logs()              # quiet: library records reach the log file, not the console
    route_library_logs(verbose=True)  # the console shows them as well
"""

from __future__ import annotations

import logging
import os

# Top-level loggers of the libraries whose records stay off the console; their children follow them.
LIBRARY_LOGGERS = ("onnx_ir", "onnxscript", "torch", "nncf", "mlflow", "alembic", "py.warnings")
# Those that print through handlers of their own, bypassing the root logger's (NNCF's is added when
# NNCF is imported, torch's and MLflow's when they are).
OWN_HANDLERS = ("nncf", "torch", "mlflow")


class _ToRoot(logging.Filter):
    """On a library's logger: hand its records to the root logger's handlers instead of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        logging.getLogger().handle(record)
        return False


class _NotFromLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == n or record.name.startswith(n + ".") for n in LIBRARY_LOGGERS)


def is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def route_library_logs(*, verbose: bool = False) -> None:
    """Send every library record through the root logger's handlers; unless ``verbose``, keep them
    off its console handlers (those present now: call it after the logging set-up, e.g. ZenML's)."""
    import mlflow  # noqa: F401 - MLflow and torch set their loggers' handlers when imported: route after
    import torch  # noqa: F401

    for name in OWN_HANDLERS:
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        logger.addFilter(_ToRoot())  # also covers a handler added later, as NNCF does on import
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger
    if verbose:
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for handler in logging.getLogger().handlers:
        if is_console(handler):
            handler.addFilter(_NotFromLibraries())
