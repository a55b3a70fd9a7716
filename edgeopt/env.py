"""ZenML's and MLflow's settings for a run, offline by default; call before importing zenml.

The user's own set-up wins: a ZenML they already configured (``ZENML_CONFIG_PATH``, ``ZENML_STORE_URL``,
or a global ZenML config, e.g. after ``zenml login`` to their team's server) is the one edgeopt runs on,
with its active stack. Only where there is none does edgeopt keep an embedded ZenML store in its state
folder (``.edgeopt/zenml``), so that a first run needs no set-up and leaves nothing outside the project.
MLflow's ``MLFLOW_TRACKING_URI`` is read by the config (``RunConfig.tracking_uri``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from edgeopt.config import state_dir


def user_zenml() -> Optional[str]:
    """What already tells ZenML where its store is (an environment variable or the global config file), or None."""
    for var in ("ZENML_CONFIG_PATH", "ZENML_STORE_URL"):
        if os.environ.get(var):
            return var
    import click  # ZenML's own rule for its global config folder (io_utils.get_global_config_directory)

    config = Path(click.get_app_dir("zenml")) / "config.yaml"
    return str(config) if config.is_file() else None


def configure_local_state() -> None:
    """Defaults only: anything the user already set (a ZenML config, a server, MLflow's variables) wins."""
    if user_zenml() is None:
        os.environ["ZENML_CONFIG_PATH"] = str(state_dir() / "zenml")
    os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
    os.environ.setdefault("ZENML_ENABLE_RICH_TRACEBACK", "false")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    # A tracking server that is down fails in seconds, not after MLflow's default of 7 retries with a
    # doubling back-off (minutes): 3 retries 1, 2 and 4 s apart, and a minute per request at most.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def zenml_store_text() -> str:
    """Which ZenML store a run uses, for the log: the user's (and how it was found) or the embedded one."""
    embedded = str(state_dir() / "zenml")
    if os.environ.get("ZENML_CONFIG_PATH") == embedded:
        return f"ZenML: the embedded store in {embedded} (no ZenML of yours configured)"
    return f"ZenML: yours ({user_zenml()})"
