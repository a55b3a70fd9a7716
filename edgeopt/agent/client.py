"""The pipeline's side of an agent: ask who it is (pre-flight), pack a job, send it, read the answer.

Plain ``urllib`` (standard library): the client runs inside ``evaluate`` wherever that runs
(the local stack, a Kubeflow pod) and needs nothing installed. Every failure is one line naming the
agent: it does not answer, it did not answer in time, it refused the token, it refused the job.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from edgeopt.measure.latency import Latency, Measured

INFO_TIMEOUT_S = 10.0


class AgentError(RuntimeError):
    """An agent that could not be used, phrased as one line."""


class Agent:
    def __init__(self, url: str, token: str, timeout_s: float = 900.0, ca_file: Optional[Path] = None):
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) \
            if url.startswith("https://") else None

    def _call(self, method: str, path: str, timeout: float, body: Any = None, length: int = 0) -> Dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers.update({"Content-Type": "application/x-tar", "Content-Length": str(length)})
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.context) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            if err.code == 401:
                raise AgentError(f"agent {self.url} refused the token") from None
            try:
                detail = json.loads(err.read()).get("detail", "")
            except (ValueError, AttributeError, OSError):
                detail = err.reason
            raise AgentError(f"agent {self.url} refused {method} {path} ({err.code}): {detail}") from None
        except (TimeoutError, socket.timeout):
            raise AgentError(f"agent {self.url} did not answer within {timeout:g} s") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise AgentError(f"agent {self.url} did not answer within {timeout:g} s") from None
            if isinstance(err.reason, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
                raise AgentError(f"agent {self.url} dropped the connection: {err.reason}") from None
            raise AgentError(f"agent {self.url} does not answer: {err.reason}") from None
        except (http.client.HTTPException, OSError, ValueError) as err:
            raise AgentError(f"agent {self.url} dropped the connection: {type(err).__name__}: {err}") from None

    def info(self, timeout: float = INFO_TIMEOUT_S) -> Dict[str, Any]:
        """Fingerprint, runtimes offered and bounds; checks that the agent answers and takes the token."""
        return self._call("GET", "/info", timeout)

    def run(self, job: Path) -> Dict[str, Any]:
        """Send a packed job (:func:`pack_job`) and wait for what it measured (up to ``timeout_s``).

        The token, the agent's state and the job's size are checked first with a GET: an agent that
        refuses a request before reading its body closes the connection under the upload, and the
        client would see a broken pipe instead of the reason."""
        about = self.info()
        size = os.path.getsize(job)
        if about["busy"]:
            raise AgentError(f"agent {self.url} is busy with another job (it runs one at a time)")
        if size > about["max_body_bytes"]:
            raise AgentError(f"agent {self.url} takes jobs up to {about['max_body_bytes'] / 1e6:.2f} MB; this one has "
                             f"{size / 1e6:.2f} MB (the models and the test images)")
        with open(job, "rb") as f:
            return self._call("POST", "/jobs", self.timeout_s, body=f, length=size)


def pack_job(dest: Path, settings: Dict[str, Any], models: Dict[str, Tuple[str, Path, List[Path]]],
             inputs: Iterable[np.ndarray], n_inputs: int, x: np.ndarray) -> Path:
    """Write a job tar to ``dest``: ``settings`` (threads, batch, warmup, iterations, time_budget_s),
    ``models`` (key -> (runtime, model file, all its files)), the accuracy ``inputs`` (batches,
    ``n_inputs`` rows in all, streamed into one .npy) and ``x``, the batch every model is timed on."""
    with tempfile.TemporaryDirectory(prefix="edgeopt-job-") as tmp:
        arrays = Path(tmp)
        out = np.lib.format.open_memmap(arrays / "inputs.npy", mode="w+", dtype=np.float32, shape=(n_inputs, *x.shape[1:]))
        i = 0
        for b in inputs:
            out[i:i + len(b)] = b
            i += len(b)
        out.flush()
        del out
        np.save(arrays / "latency.npy", np.ascontiguousarray(x, dtype=np.float32))
        listed: List[Dict[str, str]] = []
        with tarfile.open(dest, "w:") as tar:
            for n, (key, (runtime, model_file, files)) in enumerate(models.items()):
                listed.append({"key": key, "runtime": runtime, "file": f"models/{n}/{model_file.name}"})
                for f in files:
                    tar.add(f, arcname=f"models/{n}/{f.name}")
            for name in ("inputs.npy", "latency.npy"):
                tar.add(arrays / name, arcname=name)
            (arrays / "job.json").write_text(json.dumps({"settings": settings, "models": listed}))
            tar.add(arrays / "job.json", arcname="job.json")
    return dest


def measured(result: Dict[str, Any]) -> Dict[str, Measured]:
    """An agent's answer as :class:`Measured` per model key, as if measured here."""
    return {
        key: Measured(
            predictions=np.asarray(m["predictions"], np.int32) if m["predictions"] is not None else None,
            coverage=m["coverage"], settings=m["settings"],
            latency=Latency(**m["latency"]) if m["latency"] is not None else None, error=m["error"],
        )
        for key, m in result["models"].items()
    }
