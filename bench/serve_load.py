"""Load test of ``run.py serve`` across a redeploy, on loopback only.

Deploys a tiny model (ONNX on ONNX Runtime) to a temporary deploy folder, starts the server in a
subprocess on 127.0.0.1, drives it from this process with concurrent clients (JSON tensors and
PNG uploads) for a bounded time and request count, deploys a second model (OpenVINO IR) half-way,
and prints requests/s, p50/p99 latency and the errors, which must be 0. Every answer is checked:
status 200, one prediction, and the label the answering bundle's model must give.

    .venv/bin/python bench/serve_load.py                     # 60 s, 8 clients
    .venv/bin/python bench/serve_load.py --duration 5 --clients 4

Exit status 0 only when there was no error and the new bundle answered after the redeploy.
The helpers (tiny models, bundles, a server subprocess, the load loop) are used by tests/test_serving.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

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
from edgeopt.deploy import Bundle, deploy  # noqa: E402

HOST = "127.0.0.1"  # loopback only: this benchmark never sends traffic anywhere else
DIGITS = (1, 8, 8)
LABELS = [str(i) for i in range(10)]


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(root: Path, *, token: Optional[str] = None, args: Sequence[str] = (),
                   timeout: float = 90.0) -> Iterator[str]:
    """``run.py serve`` over ``root`` in a subprocess on 127.0.0.1 and a free port; yields its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPT_SERVE_TOKEN"}
    if token is not None:
        env["EDGEOPT_SERVE_TOKEN"] = token
    cmd = [sys.executable, str(ROOT / "run.py"), "serve", "--deploy-root", str(root), "--host", HOST,
           "--port", str(port), "--no-access-log", *args]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://{HOST}:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out.seek(0)
                    raise RuntimeError(f"server did not come up (exit {proc.returncode}):\n"
                                       f"{out.read().decode(errors='replace')[-2000:]}")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield base
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


async def drive(base: str, *, duration: float, max_requests: int, clients: int,
                redeploy: Callable[[], Bundle], expected_labels: Dict[str, str],
                shape: Sequence[int] = DIGITS, token: Optional[str] = None) -> dict:
    """Send /predict requests from ``clients`` concurrent clients until ``duration`` s or ``max_requests``;
    call ``redeploy`` (in a thread) half-way. ``expected_labels`` maps a bundle version to the label its
    model gives every input."""
    payloads = _payloads(shape)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies, errors, kinds, served = [], [], Counter(), Counter()
    first_answer: Dict[str, float] = {}
    sent = 0
    start = time.perf_counter()
    stop = start + duration
    switch: Dict[str, float] = {}

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.perf_counter() < stop and sent < max_requests:
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
        await asyncio.gather(redeployer(), *(client(http) for _ in range(clients)))
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
    }


def report(r: dict) -> str:
    switch = "never" if r["switch_s"] is None else f"{r['switch_s']:.2f} s after the switch"
    return "\n".join([
        f"serve_load: {r['seconds']:.1f} s, {r['clients']} clients, loopback {HOST}",
        f"requests   {r['requests']} ({', '.join(f'{k} {v}' for k, v in sorted(r['kinds'].items()))})",
        f"throughput {r['rps']:.1f} requests/s",
        f"latency    p50 {r['p50_ms']:.2f} ms   p99 {r['p99_ms']:.2f} ms",
        f"errors     {r['errors']}" + "".join(f"\n  {e}" for e in r["error_samples"]),
        f"redeploy   at {r['redeploy_at_s']:.1f} s (deploy took {r['deploy_s']:.2f} s); new bundle "
        f"v{r['new_version']} answered first {switch}",
        "answers    " + ", ".join(f"v{k}: {v}" for k, v in sorted(r["served"].items())),
    ])


def run_bench(duration: float, max_requests: int, clients: int) -> Tuple[dict, bool]:
    with tempfile.TemporaryDirectory(prefix="edgeopt-serve-load-") as tmp:
        root = Path(tmp) / "deploy"
        first, second = tiny_model_dir("onnx", favour=3), tiny_model_dir("openvino", seed=1, favour=7)
        deploy_tiny(root, first, fmt="onnx", version="1")
        with running_server(root) as base:
            result = asyncio.run(drive(
                base, duration=duration, max_requests=max_requests, clients=clients,
                redeploy=lambda: deploy_tiny(root, second, fmt="openvino", version="2"),
                expected_labels={"1": "3", "2": "7"},
            ))
    return result, result["errors"] == 0 and result["switch_s"] is not None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests (default 200000)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    a = p.parse_args(argv)
    if a.duration <= 0 or a.max_requests < 2 or a.clients < 1:
        p.error("--duration must be > 0, --max-requests >= 2, --clients >= 1")
    result, ok = run_bench(a.duration, a.max_requests, a.clients)
    print(report(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
