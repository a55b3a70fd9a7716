"""A team's services on one machine, as processes: PostgreSQL (MLflow's backend store), an S3 object
store (moto's server), ``mlflow server`` proxying its artifacts to that store, a ZenML server, and the
ZenML stack ``edgeopt_team`` (local orchestrator + the S3 artifact store) registered on it.

    python infra/team/stack.py up [--dir .edgeopt/team]   # start everything; Ctrl-C stops it

``up`` writes ``<dir>/team.env`` (``source`` it on a client: the ZenML server, its login, the active
stack) and prints the ``tracking.uri`` for the run config. ``infra/team/README.md`` maps each service to
what a team runs on real hosts. ``tests/test_team_stack.py`` starts and stops the same services.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional

BUCKET = "edgeopt"
STACK = "edgeopt_team"
ARTIFACT_STORE = "team_s3"
S3_SECRET = "edgeopt_s3"
ZENML_USER = "admin"
MLFLOW_DB = "mlflow"
PG_USER = "edgeopt"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ready: Callable[[], bool], proc: Optional[subprocess.Popen], log: Optional[Path],
          timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s (log: {log})")
        time.sleep(0.3)


def _http_ok(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    return ready


def _pg_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, or in Debian's versioned folder (postgresql-NN)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise RuntimeError(f"{name} not found: install PostgreSQL (apt-get install -y postgresql)")
    return str(versions[-1])


class TeamStack:
    """Start with ``start()`` (or ``with TeamStack(dir) as stack:``), stop with ``stop()``.

    ``client_env(config_dir)`` is the environment of a client host: its own ZenML config folder,
    logged in to the ZenML server, with the team stack active. ``mlflow_uri`` goes into the run
    config's ``tracking.uri``.
    """

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.procs: List[subprocess.Popen] = []
        self.pgdata: Optional[Path] = None
        self.as_postgres: List[str] = []
        self.s3_key, self.s3_secret = "edgeopt-team", secrets.token_hex(16)
        self.zenml_password = secrets.token_urlsafe(16)
        self.pg_password = secrets.token_urlsafe(16)
        self.ports: Dict[str, int] = {}
        self.stack_id = ""

    # -- the services -------------------------------------------------------------------------
    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def zenml_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['zenml']}"

    @property
    def postgres_uri(self) -> str:
        """MLflow's backend store, without the password: MLflow's server gets it as PGPASSWORD (libpq), not
        on its command line."""
        return self.database_uri(MLFLOW_DB)

    def database_uri(self, name: str) -> str:
        """A database of the stack's PostgreSQL as an SQLAlchemy URL, without the password (``pg_env()``)."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.ports['postgres']}/{name}"

    def pg_env(self) -> Dict[str, str]:
        """What a PostgreSQL client (libpq: psycopg2, SQLAlchemy) reads the password from."""
        return {"PGPASSWORD": self.pg_password}

    def create_database(self, name: str) -> str:
        """A new database (MLflow's; an Optuna study's storage) owned by the stack's user; its URL."""
        import psycopg2
        from psycopg2 import sql

        admin = psycopg2.connect(host="127.0.0.1", port=self.ports["postgres"], user=PG_USER,
                                 password=self.pg_password, dbname="postgres")
        admin.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with admin.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            admin.close()
        return self.database_uri(name)

    def _spawn(self, name: str, cmd: List[str], env: Dict[str, str]) -> subprocess.Popen:
        log = self.root / "logs" / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    cwd=self.root)
        self.procs.append(proc)
        return proc

    def start(self) -> "TeamStack":
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in ("postgres", "s3", "mlflow", "zenml")}
        try:
            self._start_postgres()
            self._start_s3()
            self._start_mlflow()
            self._start_zenml()
            self.stack_id = self._register_stack()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_postgres(self) -> None:
        """initdb + pg_ctl as an unprivileged user (PostgreSQL refuses root: then as ``postgres``, in a
        folder of its own under the temp dir, since the checkout may not be readable by it)."""
        if os.geteuid() == 0:
            self.pgdata = Path(tempfile.mkdtemp(prefix="edgeopt-pg-"))
            shutil.chown(self.pgdata, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        else:
            self.pgdata = self.root / "postgres"
            self.pgdata.mkdir(exist_ok=True)
        data, pwfile = self.pgdata / "data", self.pgdata / "pwfile"
        pwfile.write_text(self.pg_password)
        if self.as_postgres:
            shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run([*self.as_postgres, _pg_bin("initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}",
                        "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"], check=True, capture_output=True, text=True)
        pwfile.unlink()
        log = self.pgdata / "postgres.log"
        subprocess.run([*self.as_postgres, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                        "-o", f"-h 127.0.0.1 -p {self.ports['postgres']} -k {self.pgdata}", "start"],
                       check=True, capture_output=True, text=True)
        self.create_database(MLFLOW_DB)

    def _start_s3(self) -> None:
        proc = self._spawn("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.ports["s3"])],
                           dict(os.environ))
        _wait("the S3 server (moto)", _http_ok(f"{self.s3_url}/moto-api/"), proc, self.root / "logs" / "s3.log")
        import boto3

        boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id=self.s3_key,
                     aws_secret_access_key=self.s3_secret, region_name="us-east-1").create_bucket(Bucket=BUCKET)

    def _s3_env(self) -> Dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.s3_key, "AWS_SECRET_ACCESS_KEY": self.s3_secret,
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.s3_url}

    def _start_mlflow(self) -> None:
        # job execution: MLflow's GenAI jobs (judges, scorers) in 15 huey worker threads; unused here
        env = {**os.environ, **self._s3_env(), **self.pg_env(), "MLFLOW_ENABLE_TELEMETRY": "false",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc = self._spawn("mlflow", [
            str(BIN / "mlflow"), "server", "--backend-store-uri", self.postgres_uri,
            "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1",
            "--port", str(self.ports["mlflow"]), "--workers", "2"], env)
        _wait("mlflow server", _http_ok(f"{self.mlflow_uri}/health"), proc, self.root / "logs" / "mlflow.log", 180)

    def _start_zenml(self) -> None:
        home = self.root / "zenml-server"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ZENML_", "AWS_"))}
        env.update({
            "ZENML_CONFIG_PATH": str(home / "config"),
            "ZENML_STORE_URL": f"sqlite:///{home / 'zenml.db'}",
            "ZENML_SERVER_DEPLOYMENT_TYPE": "other",
            "ZENML_SERVER_AUTO_ACTIVATE": "true",
            "ZENML_DEFAULT_USER_NAME": ZENML_USER,
            "ZENML_DEFAULT_USER_PASSWORD": self.zenml_password,
            "ZENML_SERVER_JWT_SECRET_KEY": secrets.token_hex(32),
            "ZENML_ANALYTICS_OPT_IN": "false",
            "ZENML_ENABLE_RICH_TRACEBACK": "false",
        })
        proc = self._spawn("zenml", [str(BIN / "python"), "-m", "uvicorn", "zenml.zen_server.zen_server_api:app",
                                     "--host", "127.0.0.1", "--port", str(self.ports["zenml"]), "--no-server-header"],
                           env)
        _wait("the ZenML server", _http_ok(f"{self.zenml_url}/health"), proc, self.root / "logs" / "zenml.log", 180)

    def _register_stack(self) -> str:
        """Register the S3 secret, the artifact store and the stack on the server, from a client
        process (this process may hold another ZenML store); returns the stack's id."""
        env = self.client_env(self.root / "zenml-admin", with_stack=False)
        proc = subprocess.run([str(BIN / "python"), str(Path(__file__).resolve()), "register",
                               "--s3-url", self.s3_url, "--key", self.s3_key, "--secret", self.s3_secret],
                              env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"registering the ZenML stack failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])["stack_id"]

    def client_env(self, config_dir: Path, with_stack: bool = True) -> Dict[str, str]:
        """A client host's environment: its own ZenML config, the team's ZenML server and stack."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZENML_")}
        env.update(self.client_vars(config_dir, with_stack))
        return env

    def client_vars(self, config_dir: Path, with_stack: bool = True) -> Dict[str, str]:
        out = {
            "ZENML_CONFIG_PATH": str(config_dir),
            "ZENML_STORE_URL": self.zenml_url,
            "ZENML_STORE_USERNAME": ZENML_USER,
            "ZENML_STORE_PASSWORD": self.zenml_password,
            "ZENML_ANALYTICS_OPT_IN": "false",
            "ZENML_ENABLE_RICH_TRACEBACK": "false",
            "MLFLOW_ENABLE_TELEMETRY": "false",
        }
        if with_stack:
            out["ZENML_ACTIVE_STACK_ID"] = self.stack_id
        return out

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []
        if self.pgdata is not None and (self.pgdata / "data" / "postmaster.pid").exists():
            subprocess.run([*self.as_postgres, _pg_bin("pg_ctl"), "-D", str(self.pgdata / "data"), "-m", "fast",
                            "-w", "stop"], capture_output=True)
        if self.pgdata is not None and self.as_postgres:
            shutil.rmtree(self.pgdata, ignore_errors=True)

    def __enter__(self) -> "TeamStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def register(s3_url: str, key: str, secret: str) -> str:
    """On a client logged in to the ZenML server: the S3 credentials as a ZenML secret, the S3
    artifact store that reads them, and the stack (default local orchestrator + that store)."""
    from zenml.client import Client
    from zenml.enums import StackComponentType
    from zenml.models import UserUpdate

    client = Client()
    # the admin account is the script's: no e-mail, and no survey before the dashboard's first page.
    # Through /current-user: ZenML 0.98's /users/{id} drops email_opted_in (Client.update_user's path)
    client.zen_store.put("/current-user", body=UserUpdate(email_opted_in=False,
                                                          user_metadata={"finished_onboarding_survey": True}))
    client.create_secret(S3_SECRET, values={"aws_access_key_id": key, "aws_secret_access_key": secret})
    client.create_stack_component(
        ARTIFACT_STORE, flavor="s3", component_type=StackComponentType.ARTIFACT_STORE,
        configuration={"path": f"s3://{BUCKET}/zenml", "authentication_secret": S3_SECRET,
                       "client_kwargs": {"endpoint_url": s3_url, "region_name": "us-east-1"}},
    )
    stack = client.create_stack(STACK, components={StackComponentType.ORCHESTRATOR: "default",
                                                   StackComponentType.ARTIFACT_STORE: ARTIFACT_STORE})
    return str(stack.id)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start every service, write <dir>/team.env, wait for Ctrl-C")
    up.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[2] / ".edgeopt" / "team")
    reg = sub.add_parser("register", help="(internal) register the team stack from a logged-in client")
    reg.add_argument("--s3-url", required=True)
    reg.add_argument("--key", required=True)
    reg.add_argument("--secret", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "register":
        print(json.dumps({"stack_id": register(args.s3_url, args.key, args.secret)}))
        return
    if args.dir.exists():
        shutil.rmtree(args.dir)  # the object store is in memory: nothing here outlives a previous `up`
    stack = TeamStack(args.dir)
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a backgrounded shell job ignores it otherwise
        signal.signal(sig, lambda *_: sys.exit(0))
    with stack:
        env_file = args.dir / "team.env"
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in stack.client_vars(args.dir / "client").items()))
        env_file.chmod(0o600)
        print(f"PostgreSQL  127.0.0.1:{stack.ports['postgres']} (MLflow's backend store)\n"
              f"S3 (moto)   {stack.s3_url}  bucket {BUCKET}\n"
              f"MLflow      {stack.mlflow_uri}  (artifacts proxied to s3://{BUCKET}/mlflow)\n"
              f"ZenML       {stack.zenml_url}  (user {ZENML_USER}, stack {STACK})\n\n"
              f"source {env_file}\n"
              f"then set tracking.uri: {stack.mlflow_uri} in the run config; Ctrl-C stops everything", flush=True)
        signal.pause()


if __name__ == "__main__":
    main()
