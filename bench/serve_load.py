"""Load test of ``run.py serve`` across a redeploy and under attack, on loopback only.

Deploys a tiny model (ONNX on ONNX Runtime) to a temporary deploy folder, starts the server in a
subprocess on 127.0.0.1 with its default limits, drives it from this process with concurrent
normal clients (JSON tensors and PNG uploads) for a bounded time and request count, deploys a
second model (OpenVINO IR) half-way, and at the same time runs two attackers:

- a slow-header client: keeps 16 sockets open, each sending the start of a request and then one
  header line a second, and reconnects whenever the server drops one (it must, within its
  request-receipt timeout);
- a decompression-bomb client: one request after another, cycling through an ICO wrapping a
  13000x13000 PNG, that PNG itself (about 170 KB), an EPS with an endless loop, 8 images of
  4096x4096 in one request (over the per-request pixel budget), and 2 of them (at the budget:
  decoded, the most expensive legal request); each must get its expected status.

It prints the normal clients' requests/s, p50/p99 latency and errors (which must be 0), what the
attackers got, and the server's peak RSS (VmHWM from /proc; must stay under 1 GB). Every normal
answer is checked: status 200, one prediction, and the label the answering bundle's model gives.

    nice .venv/bin/python bench/serve_load.py                 # 60 s, 8 clients + the two attackers
    .venv/bin/python bench/serve_load.py --quick              # 5 s, 4 clients + the two attackers
    .venv/bin/python bench/serve_load.py --no-attack          # the normal clients alone

Exit status 0 only when the normal clients saw no error, the new bundle answered after the
redeploy, every attack got its expected answer, no slow socket outlived the timeout by more than
2 s, and the peak RSS stayed under 1 GB. The helpers (tiny models, bundles, a server subprocess,
the load loop, the attackers) are used by tests/test_serving.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import httpx2 as httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgeopt import formats  # noqa: E402
from edgeopt.artifacts import new_workdir  # noqa: E402
from edgeopt.deploy.bundle import Bundle  # noqa: E402
from edgeopt.deploy.folder import deploy  # noqa: E402

HOST = "127.0.0.1"  # loopback only: this benchmark never sends traffic anywhere else
DIGITS = (1, 8, 8)
LABELS = [str(i) for i in range(10)]
REQUEST_TIMEOUT_S = 10.0  # the server's default request-receipt timeout (run.py serve --request-timeout)
RSS_LIMIT = 1 << 30


def tiny_onnx(path: Path, *, shape: Sequence[int] = DIGITS, classes: int = 10, seed: int = 0,
              favour: Optional[int] = None) -> Path:
    """A small CNN (conv 3x3 -> relu -> linear) with a dynamic batch axis; ``favour`` biases one class to win."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    bias = np.zeros(classes, np.float32)
    if favour is not None:
        bias[favour] = 100.0
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, c, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.2, (classes, 4 * h * w)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(bias, "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_model_dir(fmt: str, **kwargs) -> Path:
    """A folder with ``model.onnx`` (fmt 'onnx') or ``model.xml``+``model.bin`` (fmt 'openvino')."""
    out = new_workdir(f"tiny-{fmt}")
    with tempfile.TemporaryDirectory() as tmp:
        formats.get(fmt).from_onnx(tiny_onnx(Path(tmp) / "model.onnx", **kwargs), out)
    return out


def deploy_tiny(root: Path, model_dir: Path, *, fmt: str, version: str, shape: Sequence[int] = DIGITS,
                labels: Sequence[str] = tuple(LABELS), keep: int = 5) -> Bundle:
    """Deploy a model folder from :func:`tiny_model_dir` as the next bundle of ``root``."""
    c = shape[0]
    f = formats.get(fmt)
    files = sorted((p.name for p in model_dir.iterdir() if p.name.startswith("model.")),
                   key=lambda n: (n != f.model_filename, n))  # the file a runtime opens first
    return deploy(
        model_dir, root, name=f"tiny-v{version}", model_files=files,
        runtime={"runtime": f.native_runtime, "threads": 1}, labels=list(labels),
        keep=keep, info={
            "registered_model": "tiny", "version": version, "variant": f"tiny-fp32-{fmt}",
            "metrics": {"accuracy": 0.5}, "preprocessing": {
                "input_shape": list(shape), "mean": [0.5] * c, "std": [0.25] * c, "scale": 255.0},
        },
    )


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Live:
    """A server started by :func:`running_server`; ``str()`` of it is its base URL (``f"{live}/health"``)."""

    base: str  # e.g. http://127.0.0.1:8123
    host: str  # the address it is bound to, without brackets
    port: int
    pid: int
    verify: Union[ssl.SSLContext, bool]  # what an httpx client needs to trust it (HTTPS: the certificate)

    def __str__(self) -> str:
        return self.base

    def peak_rss(self) -> int:
        """The server's peak resident memory so far (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmHWM in /proc/{self.pid}/status")


@contextmanager
def running_server(root: Path, *, token: Optional[str] = None, args: Sequence[str] = (), host: str = HOST,
                   certfile: Optional[Path] = None, keyfile: Optional[Path] = None,
                   timeout: float = 90.0) -> Iterator[Live]:
    """``run.py serve`` over ``root`` in a subprocess on ``host`` (loopback) and a free port, over HTTPS
    with ``certfile``/``keyfile``. Up once its /health names the bundle ``root/current`` points at
    (not some other server that took the port)."""
    bare = host.strip("[]")
    port = free_port(bare)
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPT_SERVE_TOKEN"}
    if token is not None:
        env["EDGEOPT_SERVE_TOKEN"] = token
    tls = [] if certfile is None else ["--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile)]
    cmd = [sys.executable, str(ROOT / "run.py"), "serve", "--deploy-root", str(root), "--host", host,
           "--port", str(port), "--no-access-log", *tls, *args]
    live = Live(base=f"{'http' if certfile is None else 'https'}://{f'[{bare}]' if ':' in bare else bare}:{port}",
                host=bare, port=port, pid=0,
                verify=True if certfile is None else ssl.create_default_context(cafile=str(certfile)))
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        live = replace(live, pid=proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out.seek(0)
                    raise RuntimeError(f"server did not come up (exit {proc.returncode}):\n"
                                       f"{out.read().decode(errors='replace')[-2000:]}")
                try:
                    r = httpx.get(f"{live.base}/health", headers=auth, timeout=2, verify=live.verify)
                    if r.status_code == 200 and r.json().get("current") == os.readlink(root / "current"):
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield live
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _payloads(shape: Sequence[int], n: int = 8) -> list:
    """Request bodies: JSON tensors and PNG uploads (one item each), made once."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        if i % 4 == 3:
            mode = "L" if shape[0] == 1 else "RGB"
            pixels = rng.integers(0, 256, (shape[1] * 4, shape[2] * 4, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
            out.append(("image", {"files": {"file": ("x.png", buf.getvalue(), "image/png")}}))
        else:
            out.append(("json", {"json": {"inputs": rng.normal(0, 1, tuple(shape)).round(4).tolist()}}))
    return out


Attacker = Callable[[float], Awaitable[dict]]  # given the time.perf_counter() to stop at, returns its tally


async def drive(base: str, *, duration: float, max_requests: int, clients: int,
                redeploy: Callable[[], Bundle], expected_labels: Dict[str, str],
                shape: Sequence[int] = DIGITS, token: Optional[str] = None,
                attackers: Dict[str, Attacker] = {},  # noqa: B006 - read only
                await_switch_s: float = 0.0) -> dict:
    """Send /predict requests from ``clients`` concurrent clients until ``duration`` s or ``max_requests``;
    call ``redeploy`` (in a thread) half-way. ``expected_labels`` maps a bundle version to the label its
    model gives every input. ``attackers`` run alongside until the same end; their tallies come back
    under ``"attacks"``. ``await_switch_s``: the normal clients go on up to this much longer until the
    redeployed bundle has answered (a loaded machine can take longer to load it than half the run)."""
    payloads = _payloads(shape)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies, errors, kinds, served = [], [], Counter(), Counter()
    first_answer: Dict[str, float] = {}
    sent = 0
    start = time.perf_counter()
    stop = start + duration
    switch: Dict[str, float] = {}

    def going() -> bool:
        now = time.perf_counter()
        switched = switch.get("version") in served
        return sent < max_requests and (now < stop or (not switched and now < stop + await_switch_s))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while going():
            kind, request = payloads[sent % len(payloads)]
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post("/predict", **request)
                body = r.json() if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - t0)
            kinds[kind] += 1
            if body is None:
                errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            elif len(body["predictions"]) != 1 or body["predictions"][0]["label"] != expected_labels[body["version"]]:
                errors.append(f"wrong answer from bundle {body['version']}: {body['predictions'][:1]}")
            else:
                served[body["version"]] += 1
                first_answer.setdefault(body["version"], time.perf_counter())

    async def redeployer() -> None:
        while time.perf_counter() - start < duration / 2 and sent < max_requests / 2:
            await asyncio.sleep(0.01)
        switch["at"] = time.perf_counter()
        bundle = await asyncio.to_thread(redeploy)
        switch["done"] = time.perf_counter()
        switch["version"] = bundle.manifest["version"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as http:
        tallies = await asyncio.gather(*(attack(stop) for attack in attackers.values()), redeployer(),
                                       *(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat_ms = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    new_first = first_answer.get(switch["version"])
    return {
        "seconds": elapsed, "requests": len(latencies), "rps": len(latencies) / elapsed, "clients": clients,
        "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
        "errors": len(errors), "error_samples": errors[:5], "kinds": dict(kinds), "served": dict(served),
        "redeploy_at_s": switch["at"] - start, "deploy_s": switch["done"] - switch["at"],
        "new_version": switch["version"],
        "switch_s": None if new_first is None else new_first - switch["done"],
        "attacks": dict(zip(attackers, tallies[:len(attackers)], strict=True)),
    }


async def slow_headers(host: str, port: int, stop: float, *, sockets: int = 16, drip_s: float = 1.0) -> dict:
    """Keep ``sockets`` connections that send a request's first line and then one header line every
    ``drip_s`` seconds, never finishing; reconnect each as soon as the server drops it. Returns how
    many the server dropped and the longest any of them lived, dropped or still open at ``stop``."""
    dropped: List[float] = []
    open_at_end: List[float] = []
    refused = 0

    async def one() -> None:
        nonlocal refused
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                refused += 1
                await asyncio.sleep(drip_s)
                continue
            try:
                writer.write(f"POST /predict HTTP/1.1\r\nHost: {host}\r\n".encode())
                i = 0
                while time.perf_counter() < stop:
                    await writer.drain()
                    try:
                        if await asyncio.wait_for(reader.read(1024), timeout=drip_s) == b"":
                            dropped.append(time.perf_counter() - t0)
                            break
                    except asyncio.TimeoutError:
                        pass
                    writer.write(f"X-Slow-{i}: {'x' * 8}\r\n".encode())
                    i += 1
                else:
                    open_at_end.append(time.perf_counter() - t0)
            except OSError:
                dropped.append(time.perf_counter() - t0)
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(sockets)))
    return {"sockets": sockets, "dropped": len(dropped), "refused": refused, "open_at_end": len(open_at_end),
            "longest_s": max(dropped + open_at_end, default=0.0)}


def png_zeros(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of ``width`` x ``height`` black pixels, compressed row by row: a
    13000x13000 one is about 170 KB and never exists decoded in this process."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    z, row, parts = zlib.compressobj(9), bytes(width + 1), []  # each row: filter byte 0, then the pixels
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def bombs() -> List[Tuple[str, List[bytes], int]]:
    """(name, image files of one request, the status it must get), built once."""
    huge = png_zeros(13000, 13000)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(huge), 22) + huge
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{} loop\n"
    full = png_zeros(4096, 4096)
    return [("ico-13000x13000", [ico], 415), ("png-13000x13000", [huge], 413), ("eps-loop", [eps], 415),
            ("8x4096x4096", [full] * 8, 413), ("2x4096x4096", [full] * 2, 200)]


async def bomb_client(base: str, stop: float, kinds: List[Tuple[str, List[bytes], int]], *,
                      token: Optional[str] = None) -> dict:
    """Send ``kinds`` (from :func:`bombs`) one request at a time, in turn, until ``stop``; tally them,
    the slowest answer per kind, and every answer that was not the expected status."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    sent: Counter = Counter()
    slowest: Dict[str, float] = {}
    unexpected: List[str] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
        i = 0
        while time.perf_counter() < stop:
            name, files, want = kinds[i % len(kinds)]
            i += 1
            t0 = time.perf_counter()
            try:
                r = await http.post("/predict", files=[("file", (f"{name}.img", f, "application/octet-stream"))
                                                       for f in files])
                status, detail = r.status_code, r.text[:160]
            except httpx.HTTPError as err:
                status, detail = 0, f"{type(err).__name__}: {err}"
            slowest[name] = max(slowest.get(name, 0.0), time.perf_counter() - t0)
            sent[name] += 1
            if status != want:
                unexpected.append(f"{name}: HTTP {status} (expected {want}): {detail}")
    return {"sent": dict(sent), "slowest_s": slowest, "unexpected": len(unexpected),
            "unexpected_samples": unexpected[:5]}


def report(r: dict) -> str:
    switch = "never" if r["switch_s"] is None else f"{r['switch_s']:.2f} s after the switch"
    lines = []
    if "slow" in r["attacks"]:
        a = r["attacks"]["slow"]
        lines.append(f"slow       {a['sockets']} slow-header sockets: {a['dropped']} dropped by the server, "
                     f"longest lived {a['longest_s']:.1f} s (timeout {REQUEST_TIMEOUT_S:.0f} s), "
                     f"{a['open_at_end']} open at the end (younger than the timeout), {a['refused']} refused")
    if "bombs" in r["attacks"]:
        a = r["attacks"]["bombs"]
        lines.append("bombs      " + ", ".join(f"{k} x{n} (slowest {a['slowest_s'][k]:.2f} s)"
                                               for k, n in a["sent"].items())
                     + f"; unexpected answers {a['unexpected']}"
                     + "".join(f"\n  {e}" for e in a["unexpected_samples"]))
    if "peak_rss" in r:
        lines.append(f"server     peak RSS {r['peak_rss'] / 2**20:.0f} MiB (limit {RSS_LIMIT / 2**20:.0f} MiB)")
    return "\n".join([
        f"serve_load: {r['seconds']:.1f} s, {r['clients']} normal clients"
        + (f" + {', '.join(r['attacks'])} attackers" if r["attacks"] else "") + f", loopback {HOST}",
        f"requests   {r['requests']} ({', '.join(f'{k} {v}' for k, v in sorted(r['kinds'].items()))})",
        f"throughput {r['rps']:.1f} requests/s",
        f"latency    p50 {r['p50_ms']:.2f} ms   p99 {r['p99_ms']:.2f} ms",
        f"errors     {r['errors']}" + "".join(f"\n  {e}" for e in r["error_samples"]),
        f"redeploy   at {r['redeploy_at_s']:.1f} s (deploy took {r['deploy_s']:.2f} s); new bundle "
        f"v{r['new_version']} answered first {switch}",
        "answers    " + ", ".join(f"v{k}: {v}" for k, v in sorted(r["served"].items())),
        *lines,
    ])


def passed(r: dict) -> bool:
    """The goals: no error for the normal clients, the redeploy served, every attack answered as
    expected, no slow socket outliving the timeout by more than 2 s, peak RSS under 1 GB."""
    slow, bomb = r["attacks"].get("slow"), r["attacks"].get("bombs")
    return (r["errors"] == 0 and r["switch_s"] is not None
            and (slow is None or (slow["longest_s"] <= REQUEST_TIMEOUT_S + 2
                                  and (slow["dropped"] > 0 or r["seconds"] < REQUEST_TIMEOUT_S + 2)))
            and (bomb is None or bomb["unexpected"] == 0)
            and r.get("peak_rss", 0) < RSS_LIMIT)


def run_bench(duration: float, max_requests: int, clients: int, attack: bool = True) -> Tuple[dict, bool]:
    with tempfile.TemporaryDirectory(prefix="edgeopt-serve-load-") as tmp:
        root = Path(tmp) / "deploy"
        first, second = tiny_model_dir("onnx", favour=3), tiny_model_dir("openvino", seed=1, favour=7)
        deploy_tiny(root, first, fmt="onnx", version="1")
        kinds = bombs() if attack else []
        with running_server(root) as live:
            attackers: Dict[str, Attacker] = {} if not attack else {
                "slow": lambda stop: slow_headers(live.host, live.port, stop),
                "bombs": lambda stop: bomb_client(live.base, stop, kinds),
            }
            result = asyncio.run(drive(
                live.base, duration=duration, max_requests=max_requests, clients=clients,
                redeploy=lambda: deploy_tiny(root, second, fmt="openvino", version="2"),
                expected_labels={"1": "3", "2": "7"}, attackers=attackers, await_switch_s=30,
            ))
            result["peak_rss"] = live.peak_rss()
    return result, passed(result)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests (default 200000)")
    p.add_argument("--clients", type=int, default=8, help="concurrent normal clients (default 8)")
    p.add_argument("--no-attack", action="store_true", help="without the slow-header and bomb clients")
    p.add_argument("--quick", action="store_true", help="a smoke run: 5 s, 4 normal clients")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.clients = 5.0, 4
    if a.duration <= 0 or a.max_requests < 2 or a.clients < 1:
        p.error("--duration must be > 0, --max-requests >= 2, --clients >= 1")
    from bench._common import fingerprint_line, load_line
    from edgeopt.measure.latency import cpu_fingerprint

    print(fingerprint_line(cpu_fingerprint()))
    print(load_line("at the start"))
    result, ok = run_bench(a.duration, a.max_requests, a.clients, attack=not a.no_attack)
    print(report(result))
    print(load_line("at the end"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
