"""The tracking store behind a URI: a client for it, an experiment in it, and the URI with its
secrets kept out of params, tags, logs and pipeline parameters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Tuple
from urllib.parse import unquote

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    from edgeopt.config import RunConfig


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep a local store's artifacts beside its database
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently
        exp = client.get_experiment_by_name(name)
        assert exp is not None
        return exp.experiment_id


_SECRET_QUERY = re.compile(r"(?i)([?&][^=&]*(?:pass|token|secret|key)[^=&]*=)[^&]*")


def redact_uri(uri: str) -> str:
    """``uri`` with its user-info and secret-looking query values replaced by ``***``, for params,
    tags and logs (``http://alice:pw@host:5000`` -> ``http://***@host:5000``)."""
    scheme, sep, rest = uri.partition("://")
    if sep:
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:
            rest = "***@" + netloc.rpartition("@")[2] + slash + path
    return _SECRET_QUERY.sub(r"\1***", f"{scheme}{sep}{rest}")


# Where the clients read a user name and password when the URI does not carry them: MLflow's HTTP
# client, and libpq for a PostgreSQL store.
_CREDENTIAL_ENV = {"http": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                   "https": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                   "postgresql": ("PGUSER", "PGPASSWORD")}


def split_credentials(uri: str) -> Tuple[str, Dict[str, str]]:
    """``uri`` without its user-info, and the environment variables that carry it instead, for the
    schemes whose clients read them (``http://alice:pw@host`` -> ``http://host`` and
    MLFLOW_TRACKING_USERNAME/PASSWORD): what is passed on as a pipeline parameter then holds no secret."""
    scheme, sep, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    env_names = _CREDENTIAL_ENV.get(scheme.split("+")[0].lower())
    if not sep or "@" not in netloc or env_names is None:
        return uri, {}
    userinfo, _, host = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    env = {env_names[0]: unquote(user), **({env_names[1]: unquote(password)} if password else {})}
    return f"{scheme}{sep}{host}{slash}{path}", env


def without_credentials(cfg: "RunConfig") -> Tuple["RunConfig", Dict[str, str]]:
    """``cfg`` with the user-info of its tracking URI and its search storage moved to the environment
    variables their clients read (see :func:`split_credentials`), and those variables: a pipeline's
    parameters (kept in ZenML's store, shown in its dashboard) then hold no password. A storage whose
    credentials would overwrite the tracking URI's different ones (two PostgreSQL users) keeps them."""
    env: Dict[str, str] = {}
    tracking, search = cfg.tracking, cfg.variants.search
    if tracking.uri:
        uri, env = split_credentials(tracking.uri)
        tracking = tracking.model_copy(update={"uri": uri})
    if search is not None and search.storage:
        storage, more = split_credentials(search.storage)
        if all(env.get(k, v) == v for k, v in more.items()):
            env = {**env, **more}
            search = search.model_copy(update={"storage": storage})
    variants = cfg.variants.model_copy(update={"search": search})
    return cfg.model_copy(update={"tracking": tracking, "variants": variants}), env
