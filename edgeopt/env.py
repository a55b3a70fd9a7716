"""Keep ZenML's and MLflow's state inside the checkout, offline; call before importing zenml."""

from __future__ import annotations

import os

from edgeopt.config import state_dir


def configure_local_state() -> None:
    """Defaults only: anything the user already set (another ZenML config, a server) wins."""
    os.environ.setdefault("ZENML_CONFIG_PATH", str(state_dir() / "zenml"))
    os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
    os.environ.setdefault("ZENML_ENABLE_RICH_TRACEBACK", "false")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    # A tracking server that is down fails in seconds, not after MLflow's default of 7 retries with a
    # doubling back-off (minutes): 3 retries 1, 2 and 4 s apart, and a minute per request at most.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("DO_NOT_TRACK", "1")
