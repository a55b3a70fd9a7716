"""Pre-flight: check every input a run depends on before any step starts, each problem in one line.

A run reads its data, maybe a brought model, writes to an MLflow tracking store and to a deploy
folder. Each of these can be wrong in a way that would otherwise show only after minutes of
training (an unreachable tracking server is found by the ``track`` step, an unwritable deploy
folder by the last step). :func:`check_run_inputs` looks at all of them first, cheaply: the data's
tree and image headers (nothing decoded), the brought model (inspected, or a state dict loaded),
one bounded request to the tracking server, one file written and removed in the deploy folder.

No ZenML here; ``edgeopt run`` and ``edgeopt validate`` call it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from edgeopt.config import RunConfig, resolve_path
from edgeopt.data.sources import DataError, check_data
from edgeopt.models.brought import PretrainedError, expected_input, preflight

TRACKING_TIMEOUT_S = 5.0
SQL_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
SQLITE_MAGIC = b"SQLite format 3\0"


class InputError(ValueError):
    """An input of the run (tracking store, deploy folder) that cannot work, as one line naming it."""


# What pre-flight raises; each is already one line for the user.
PREFLIGHT_ERRORS = (InputError, DataError, PretrainedError)


def check_run_inputs(cfg: RunConfig) -> None:
    """Raise one of :data:`PREFLIGHT_ERRORS` for the first input the run cannot use."""
    check_data(cfg.data, cfg.seed)
    check_brought_models(cfg)
    check_tracking(cfg.tracking_uri(), cfg.tracking.experiment, timeout=TRACKING_TIMEOUT_S)
    check_deploy_root(cfg.deploy_root())


def check_brought_models(cfg: RunConfig) -> None:
    """The teacher's ONNX file is inspected against the data; a state dict (teacher or student start)
    is loaded into its architecture, as the steps will (this imports torch, only when one is set)."""
    preflight(cfg.teacher.onnx, cfg.data)
    starts = [("teacher", cfg.teacher.checkpoint)]
    if cfg.student is not None and "student" in cfg.variants.bases:
        starts.append(("student", cfg.student.checkpoint))
    if not any(path for _, path in starts):
        return
    from edgeopt.models.brought import load_state_dict_teacher
    from edgeopt.models.zoo import build_model
    from edgeopt.train.fit import load_matching_weights

    (channels, *_), classes = expected_input(cfg.data)
    assert channels is not None and classes is not None  # known from the config alone (grayscale, class folders)
    for role, path in starts:
        if path is None:
            continue
        train = cfg.teacher if role == "teacher" else cfg.student
        assert train is not None and train.arch is not None  # the schema requires an arch with a checkpoint
        try:
            if role == "teacher":
                arch = {"name": train.arch, "num_classes": classes, "in_channels": channels, "width": train.width}
                load_state_dict_teacher(path, arch, None)
            else:
                load_matching_weights(build_model(train.arch, classes, channels, train.width), path)
        except PretrainedError:
            raise
        except Exception as err:  # noqa: BLE001 - a file torch or safetensors cannot read: the user's file is wrong
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise PretrainedError(f"{resolve_path(path)}: not a loadable state dict ({type(err).__name__}"
                                  f"{': ' if reason else ''}{reason})") from None


def shown_uri(uri: str) -> str:
    """``uri`` without its user and password, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[-1]))


def check_tracking(uri: str, experiment: str, *, timeout: float = TRACKING_TIMEOUT_S) -> None:
    """The tracking store can be used: an http(s) server answers like MLflow within ``timeout``
    (one request, no retries); a SQLite file is a database (or can be created); a SQL server's port
    accepts a connection."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0]
    if scheme in ("http", "https"):
        _check_mlflow_server(uri, experiment, timeout)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in SQL_PORTS:
        parts = urllib.parse.urlsplit(uri)
        if parts.hostname:
            try:
                socket.create_connection((parts.hostname, parts.port or SQL_PORTS[scheme]), timeout=timeout).close()
            except OSError as err:
                raise InputError(f"tracking.uri: {shown_uri(uri)}: the database server does not answer "
                                 f"({_reason(err)})") from None


def _check_mlflow_server(uri: str, experiment: str, timeout: float) -> None:
    shown = shown_uri(uri)
    parts = urllib.parse.urlsplit(uri)
    base = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query="", fragment=""))
    query = urllib.parse.urlencode({"experiment_name": experiment})
    url = f"{base.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    request = urllib.request.Request(url, headers=_auth_headers(parts))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, b""
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read(4096)
    except (urllib.error.URLError, OSError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise InputError(f"tracking.uri: {shown}: the tracking server does not answer within {timeout:g} s "
                         f"({_reason(reason)})") from None
    if status in (401, 403):
        raise InputError(f"tracking.uri: {shown}: the tracking server refused the request (HTTP {status}); "
                         "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    if status == 404 and _mlflow_error(body):
        return  # the experiment does not exist yet: the run creates it
    if status >= 300:
        raise InputError(f"tracking.uri: {shown}: not an MLflow tracking server (HTTP {status} on "
                         "/api/2.0/mlflow/experiments/get-by-name)")


def _mlflow_error(body: bytes) -> bool:
    try:
        return "error_code" in json.loads(body)
    except (ValueError, TypeError):
        return False


def _auth_headers(parts: urllib.parse.SplitResult) -> dict:
    """The credentials MLflow would send: its environment variables, else the URI's user and password."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or parts.username
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or parts.password
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _check_sqlite(uri: str) -> None:
    path = Path(urllib.parse.unquote(uri[len("sqlite:///"):].split("?", 1)[0]))
    if path.is_dir():
        raise InputError(f"tracking.uri: {path}: is a folder, not an SQLite database file")
    if path.is_file():
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as err:
            raise InputError(f"tracking.uri: {path}: cannot read ({_reason(err)})") from None
        if head and head != SQLITE_MAGIC:
            raise InputError(f"tracking.uri: {path}: not an SQLite database")
        _check_writable(path.parent, "tracking.uri", path)
        return
    _check_writable(path.parent, "tracking.uri", path)


def check_deploy_root(root: Path) -> None:
    """The deploy folder is a folder (or can be made) and a file can be written there."""
    if root.exists() and not root.is_dir():
        raise InputError(f"deploy.root: {root}: is a file, not a folder")
    _check_writable(root, "deploy.root", root)


def _check_writable(folder: Path, field: str, target: Path) -> None:
    """``folder`` (or its nearest existing parent, where it would be made) takes a new file."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{field}: {target}: cannot be made, {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgeopt-write-test-", dir=existing)
    except OSError as err:
        raise InputError(f"{field}: {target}: cannot write in {existing} ({_reason(err)})") from None
    os.close(fd)
    os.unlink(probe)


def _reason(err: object) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if isinstance(err, socket.timeout):
        return "timed out"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text or type(err).__name__

