"""The agent's HTTP API (starlette on uvicorn): ``python -m edgeopt.agent`` on the device.

    GET  /health   {"status": "ok"}, no token: is the process up
    GET  /info     fingerprint (CPU, ISA, runtime versions), runtimes offered, bounds, busy
    POST /jobs     a job (an uncompressed tar, see edgeopt.agent): answers what it measured

Every endpoint but /health needs ``Authorization: Bearer <token>``; the token (16+ characters)
is read from an environment variable (``EDGEOPT_AGENT_TOKEN`` by default), never from the command
line, where the process list would show it.

Transport: it binds 127.0.0.1 by default and is reached through an SSH tunnel
(``ssh -N -L 8765:127.0.0.1:8765 user@device``): edge boards already run sshd with key
authentication, so the tunnel brings encryption and host authentication with no certificate to
issue, renew or pin, and the agent is never exposed on the device's network. Where no tunnel
is possible (a Kubeflow pod reaching a fleet of devices), ``--tls-cert``/``--tls-key`` serve HTTPS;
any address other than loopback needs them, so the token never crosses a network in clear text.

Bounds: a request body over ``--max-body-mb`` or a model over ``--max-model-mb`` is refused (413)
before anything is unpacked; one job at a time (a second gets 409); a job runs in a process of its
own, killed at ``--job-timeout-s`` (504); the job's folder is removed when it ends, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgeopt.agent import DEFAULT_PORT, MIN_TOKEN_CHARS, TOKEN_ENV
from edgeopt.measure.latency import cpu_fingerprint
from edgeopt.runtimes import RUNTIMES, distribution, installed

log = logging.getLogger("edgeopt.agent")

MEMBER = re.compile(r"^(job\.json|inputs\.npy|latency\.npy|models/\d{1,4}/model\.(onnx|xml|bin|tflite|pte))$")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # the folder holding the edgeopt package


class AgentConfigError(ValueError):
    """A bad option or environment at start-up, phrased as one line."""


@dataclass
class Settings:
    token: str
    runtimes: List[str]
    max_model_bytes: int = 256 * 10**6
    max_body_bytes: int = 1024 * 10**6
    job_timeout_s: float = 600.0
    work_dir: Optional[Path] = None
    fingerprint: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.token) < MIN_TOKEN_CHARS:
            raise AgentConfigError(f"the token must have at least {MIN_TOKEN_CHARS} characters")
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown or not self.runtimes:
            raise AgentConfigError(f"--runtimes: expected some of {', '.join(RUNTIMES)}, got {','.join(self.runtimes)}")
        missing = [r for r in self.runtimes if not installed(r)]
        if missing:
            raise AgentConfigError(f"--runtimes: {', '.join(missing)} is not installed in this Python "
                                   f"({sys.executable})")
        if not self.fingerprint:
            self.fingerprint = cpu_fingerprint([distribution(r) for r in self.runtimes])


class JobError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def installed_runtimes() -> List[str]:
    return [r for r in RUNTIMES if installed(r)]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


async def _receive(request: Request, path: Path, cap: int) -> int:
    """Stream the body to ``path``, refusing it past ``cap`` bytes (by Content-Length and by what arrives)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise JobError(413, f"request of {_mb(int(declared))} over the agent's cap of {_mb(cap)} (--max-body-mb)")
    n = 0
    with open(path, "wb") as f:
        async for chunk in request.stream():
            n += len(chunk)
            if n > cap:
                raise JobError(413, f"request over the agent's cap of {_mb(cap)} (--max-body-mb)")
            f.write(chunk)
    return n


def _unpack(archive: Path, dest: Path, settings: Settings) -> Dict[str, Any]:
    """Check every member (allowed names, regular files, each model under the size cap), then extract."""
    try:
        with tarfile.open(archive, "r:") as tar:
            members = tar.getmembers()
            per_model: Dict[str, int] = {}
            for m in members:
                if not m.isfile() or not MEMBER.match(m.name):
                    raise JobError(400, f"unexpected entry {m.name!r} in the job")
                if m.name.startswith("models/"):
                    key = m.name.rsplit("/", 1)[0]
                    per_model[key] = per_model.get(key, 0) + m.size
            for key, size in sorted(per_model.items()):
                if size > settings.max_model_bytes:
                    raise JobError(413, f"{key}: model of {_mb(size)} over the agent's cap of "
                                        f"{_mb(settings.max_model_bytes)} (--max-model-mb)")
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+: checks names and types again
                tar.extractall(dest, members=members, filter="data")
            else:  # names and types are checked above
                tar.extractall(dest, members=members)
    except tarfile.TarError as err:
        raise JobError(400, f"the job is not a readable tar: {err}") from None
    try:
        spec = json.loads((dest / "job.json").read_text())
        models = spec["models"]
        for m in models:
            if m["runtime"] not in settings.runtimes:
                raise JobError(422, f"runtime {m['runtime']!r} is not offered by this agent "
                                    f"(offered: {', '.join(settings.runtimes)})")
            if not (dest / m["file"]).is_file():
                raise JobError(400, f"model file {m['file']!r} is not in the job")
        for name in ("inputs.npy", "latency.npy"):
            if not (dest / name).is_file():
                raise JobError(400, f"{name} is not in the job")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise JobError(400, f"job.json: {type(err).__name__}: {err}") from None
    return spec


async def _run_child(folder: Path, timeout_s: float) -> Dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "edgeopt.agent.job", str(folder),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise JobError(504, f"the job ran past the agent's time budget of {timeout_s:g} s (--job-timeout-s)") from None
    if proc.returncode != 0:
        lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
        raise JobError(500, f"the job failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    return json.loads((folder / "result.json").read_text())


def create_app(settings: Settings) -> Starlette:
    lock = asyncio.Lock()
    expected = f"Bearer {settings.token}".encode()

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    def refused() -> JSONResponse:
        return JSONResponse({"detail": "missing or wrong token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def info(request: Request) -> JSONResponse:
        if not authorized(request):
            return refused()
        return JSONResponse({
            "fingerprint": settings.fingerprint, "runtimes": settings.runtimes,
            "max_model_bytes": settings.max_model_bytes, "max_body_bytes": settings.max_body_bytes,
            "job_timeout_s": settings.job_timeout_s, "busy": lock.locked(),
        })

    async def jobs(request: Request) -> JSONResponse:
        if not authorized(request):
            return refused()
        if lock.locked():
            return JSONResponse({"detail": "busy: the agent runs one job at a time"}, status_code=409)
        async with lock:
            job_id, t0 = uuid.uuid4().hex[:8], time.perf_counter()
            client = request.client.host if request.client else "?"
            folder = Path(tempfile.mkdtemp(prefix=f"edgeopt-agent-{job_id}-", dir=settings.work_dir))
            received, summary = 0, "-"
            try:
                received = await _receive(request, folder / "job.tar", settings.max_body_bytes)
                spec = await asyncio.to_thread(_unpack, folder / "job.tar", folder / "job", settings)
                (folder / "job.tar").unlink()
                counts: Dict[str, int] = {}
                for m in spec["models"]:
                    counts[m["runtime"]] = counts.get(m["runtime"], 0) + 1
                summary = f"{len(spec['models'])} models ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
                result = await _run_child(folder / "job", settings.job_timeout_s)
            except JobError as err:
                log.warning("job %s from %s: %s, %s: refused %d: %s", job_id, client, summary, _mb(received),
                            err.status, err.detail)
                return JSONResponse({"detail": err.detail}, status_code=err.status)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            job_s = time.perf_counter() - t0
            failed = sum(1 for m in result["models"].values() if m["error"])
            log.info("job %s from %s: %s, %s, %.1f s, %d failed, peak %.0f MB", job_id, client, summary, _mb(received),
                     job_s, failed, result["peak_rss_mb"])
            return JSONResponse({**result, "job": job_id, "job_s": job_s, "fingerprint": settings.fingerprint})

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/jobs", jobs, methods=["POST"]),
    ])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeopt agent",
        description="Measure models on this device for edgeopt's evaluate step (see edgeopt/agent/server.py).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: reach it through an SSH "
                                                       "tunnel); any other needs --tls-cert and --tls-key")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--token-env", default=TOKEN_ENV, help=f"environment variable holding the token, 16+ characters "
                                                          f"(default {TOKEN_ENV})")
    p.add_argument("--runtimes", default=None, help="comma-separated runtimes to offer (default: those installed: "
                                                    f"{', '.join(RUNTIMES)})")
    p.add_argument("--max-model-mb", type=float, default=256.0, help="largest model accepted, MB (default 256)")
    p.add_argument("--max-body-mb", type=float, default=1024.0,
                   help="largest job (models + test images), MB (default 1024)")
    p.add_argument("--job-timeout-s", type=float, default=600.0, help="time budget of one job, s (default 600)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where a job is unpacked while it runs (default: the system's temporary folder)")
    p.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="... and this private key (PEM)")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise AgentConfigError("--tls-cert and --tls-key go together")
        if not _is_loopback(args.host) and args.tls_cert is None:
            raise AgentConfigError(f"--host {args.host} is not loopback: serve it over TLS (--tls-cert/--tls-key) or "
                                   "keep 127.0.0.1 and reach it through an SSH tunnel")
        for opt in (args.tls_cert, args.tls_key):
            if opt is not None and not opt.is_file():
                raise AgentConfigError(f"file not found: {opt}")
        if args.work_dir is not None and not args.work_dir.is_dir():
            raise AgentConfigError(f"--work-dir: folder not found: {args.work_dir}")
        token = os.environ.get(args.token_env, "")
        if not token:
            raise AgentConfigError(f"set the token in the environment variable {args.token_env}")
        settings = Settings(
            token=token, runtimes=args.runtimes.split(",") if args.runtimes else installed_runtimes(),
            max_model_bytes=int(args.max_model_mb * 1e6), max_body_bytes=int(args.max_body_mb * 1e6),
            job_timeout_s=args.job_timeout_s, work_dir=args.work_dir,
        )
    except AgentConfigError as err:
        print(f"edgeopt agent: error: {err}", file=sys.stderr)
        sys.exit(2)
    import uvicorn

    fp = settings.fingerprint
    log.info("agent: %s (%s cores, ISA %s), runtimes %s, fingerprint %s; jobs up to %s per model, %g s",
             fp["cpu"], fp["cores"], ",".join(fp["isa"]) or "baseline", ", ".join(settings.runtimes), fp["id"],
             _mb(settings.max_model_bytes), settings.job_timeout_s)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info",
                ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
                ssl_keyfile=str(args.tls_key) if args.tls_key else None)
