"""Local inference server over a deploy folder: FastAPI served by uvicorn.

    GET  /health     status + the bundle being served (the status alone without the token, if one is set)
    GET  /metadata   version, variant, metrics, manifest, labels, runtime
    POST /predict    an image (multipart field ``file``, repeatable) or ``{"inputs": [...]}`` as JSON,
                     a normalized float tensor [N,C,H,W] or [C,H,W]; answers label, index and
                     softmax probabilities per item

The server serves ``<root>/current``. Every request reads the link (one ``readlink``); when it
points at another bundle, that bundle is loaded and verified in a background thread while the
old one goes on serving, and the reference is swapped under a lock once the new one is ready. A
bundle that fails to load is reported in /health and the old one stays in service.

Bad input is answered with a 4xx and ``{"detail": "<one line>"}``; the body size is checked
against Content-Length and against the bytes really read; image headers are read before any pixel
is decoded, against a per-image and a per-request pixel limit. A model output that is not finite
is a 500 with one line. Binding anything but loopback needs a bearer token, which then guards every
endpoint (/health shows its status alone without it), and TLS (or ``insecure=True``, said out loud).

Limits below the app: a request must arrive in full (headers and body) within ``request_timeout``
seconds of the connection opening or of the previous answer, or the connection is closed (uvicorn
has no such timeout, so a subclass of its h11 protocol keeps one); uvicorn's ``limit_concurrency``
caps the connections and requests in flight (503 beyond it); on a loopback bind, Starlette's
TrustedHostMiddleware answers 400 to a Host header that is not a loopback name (DNS rebinding), and
a request whose Origin is another site than its Host gets 403 (a web page posting through a browser).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Sequence, Tuple

import anyio
import anyio.to_thread
import h11
import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, TypeAdapter, ValidationError, model_validator
from starlette.datastructures import Headers, UploadFile
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgeopt.data.images import ImageError, ImageFormatRefused, ImageTooLarge, decode_image, image_pixels
from edgeopt.deploy.bundles import Bundle
from edgeopt.runtimes import Predictor, make_predictor

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_BATCH = 64
MAX_IMAGE_PIXELS = 4096 * 4096  # checked before decoding: a small file can hold a huge image
DEFAULT_MAX_REQUEST_PIXELS = 2 * MAX_IMAGE_PIXELS  # all the images of one request together
DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 64
DECODE_SLOTS = 4  # requests decoded and run at once (memory: about this many times the pixel budget)
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # a bundle that failed to load is tried again, backing off
MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
JSON_TYPE, MULTIPART_TYPE = "application/json", "multipart/form-data"


class ServeError(RuntimeError):
    """The server cannot start (or a bundle cannot be served), phrased as one line for the user."""


# ---------------------------------------------------------------------------------------------- bundles


class Preprocessing(BaseModel):
    """A bundle's input: the shape the model takes and the per-channel mean and std of pixels in [0, 1]."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    input_shape: Tuple[PositiveInt, PositiveInt, PositiveInt]
    mean: List[float]
    std: List[Annotated[float, Field(gt=0)]]

    @model_validator(mode="after")
    def _per_channel(self):
        c = self.input_shape[0]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean and std need one value per channel ({c})")
        return self


class _RuntimeSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    runtime: str
    threads: PositiveInt = 1


_LABELS: TypeAdapter[List[str]] = TypeAdapter(Annotated[List[str], Field(min_length=1)])


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


@dataclass
class LoadedBundle:
    """A verified bundle with its predictor; immutable once built, so requests can share it."""

    target: str  # what ``current`` pointed at when it was loaded, e.g. versions/<bundle>
    bundle: Bundle
    runtime: Dict[str, Any]
    labels: List[str]
    pre: Preprocessing
    predictor: Predictor
    loaded_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.bundle.path.name

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return self.pre.input_shape

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of a float32 [N,C,H,W] batch (one inference at a time per bundle; in
        chunks the model takes, for a model exported with a fixed batch of one): the softmax of its
        logits, or its own output for a model that outputs probabilities already, renormalized to sum
        to one (an INT8 variant's quantized softmax sums to 0.99 or so; a row of zeros is uniform)."""
        with self._lock:
            out = np.asarray(self.predictor.predict_batched(x), dtype=np.float64)
        if not np.isfinite(out).all():
            log.warning("%s: non-finite model output for a batch of %d; answered 500", self.name, len(x))
            raise HTTPException(500, "the model's output for this input is not finite (NaN or infinity); "
                                     "no answer can be given")
        if self.bundle.manifest.get("output") == "probabilities":
            p = np.clip(out, 0, None)
            total = p.sum(axis=1, keepdims=True)
            return np.where(total > 0, p / np.where(total > 0, total, 1), 1 / p.shape[1])
        z = np.exp(out - out.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def _one_line(err: Exception, path: Path) -> str:
    text = str(err).replace(f"{path}: ", "").strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def load_bundle(root: Path, target: str) -> LoadedBundle:
    """Open, verify (sha256 of every file) and warm up ``root/target``; ServeError with one line if bad."""
    path = Path(root) / target

    def validated(what: str, validate, data):
        try:
            return validate(data)
        except ValidationError as err:
            raise ServeError(f"{path}: {what}: {_first_error(err)}") from None

    try:
        bundle = Bundle(path)
        bundle.verify()
        if "preprocessing" not in bundle.manifest:
            raise ServeError(f"{path}: manifest.json has no 'preprocessing' (input_shape, mean, std)")
        pre = validated("manifest.json preprocessing", Preprocessing.model_validate, bundle.manifest["preprocessing"])
        runtime = validated("runtime.json", _RuntimeSpec.model_validate_json, (path / "runtime.json").read_bytes())
        labels = validated("labels.json", _LABELS.validate_json, (path / "labels.json").read_bytes())
        predictor = make_predictor(runtime.runtime, bundle.model_file, runtime.threads)
    except ServeError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to open a bundle (I/O, JSON, runtime) is one line
        raise ServeError(f"{path}: {_one_line(err, path)}") from None
    try:
        out = np.asarray(predictor(np.zeros((1, *pre.input_shape), np.float32)))
    except Exception as err:  # noqa: BLE001 - the runtime's own error, kept as one line
        raise ServeError(f"{path}: the model does not run on a [1,{','.join(map(str, pre.input_shape))}] input "
                         f"(preprocessing.input_shape): {_one_line(err, path)}") from None
    if out.shape != (1, len(labels)):
        raise ServeError(f"{path}: the model outputs shape {list(out.shape)} for one input but labels.json "
                         f"names {len(labels)} classes")
    return LoadedBundle(target=target, bundle=bundle, runtime={**runtime.model_dump(), **predictor.settings},
                        labels=labels, pre=pre, predictor=predictor)


@dataclass(frozen=True)
class _Failure:
    target: str
    error: str
    tries: int
    retry_at: float  # time.monotonic()


class ModelStore:
    """The bundle in service, swapped for a newly deployed one once that one has loaded.

    A bundle that fails to load is tried again after 1 s, then 2, 4 ... up to 30 s between tries (a
    deploy by rsync moves ``current`` before the bundle has arrived), while the old one serves.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.link = self.root / "current"
        if not self.root.is_dir():
            raise ServeError(f"{self.root}: deploy folder not found")
        target = self._read_link()
        if target is None:
            raise ServeError(f"{self.root}: no 'current' bundle (nothing deployed yet: run `python run.py run`)")
        self.active = load_bundle(self.root, target)
        self._lock = threading.Lock()
        self._loader: Optional[threading.Thread] = None
        self._failed: Optional[_Failure] = None  # the last bundle that did not load, tried again from retry_at

    def _read_link(self) -> Optional[str]:
        try:
            return os.readlink(self.link)
        except OSError:
            return None

    def get(self) -> LoadedBundle:
        """The bundle for this request; starts loading a newly deployed one in the background."""
        target = self._read_link()
        active, failed = self.active, self._failed
        if target is not None and target != active.target and (
                failed is None or failed.target != target or time.monotonic() >= failed.retry_at):
            with self._lock:
                if self._loader is None:
                    self._loader = threading.Thread(target=self._load, args=(target,), name="edgeopt-reload",
                                                    daemon=True)
                    self._loader.start()
        return active

    def _load(self, target: str) -> None:
        try:
            loaded = load_bundle(self.root, target)
        except ServeError as err:
            with self._lock:
                tries = self._failed.tries + 1 if self._failed is not None and self._failed.target == target else 1
                wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (tries - 1))
                self._failed = _Failure(target, str(err), tries, time.monotonic() + wait)
                self._loader = None
            log.error("reload failed (try %d, next in %.0f s), still serving %s: %s", tries, wait, self.active.name,
                      err)
            return
        with self._lock:
            self.active, self._loader, self._failed = loaded, None, None
        log.info("reload: now serving %s (%s on %s)", loaded.name, loaded.bundle.manifest.get("variant"),
                 loaded.runtime["runtime"])

    def state(self) -> Dict[str, Any]:
        """What /health reports: the bundle in service and whether ``current`` points elsewhere."""
        target = self._read_link()
        active, failed = self.active, self._failed
        if target == active.target:
            status, error = "ok", None
        elif target is None:
            status, error = "degraded", f"{self.link} is missing; serving the last bundle loaded"
        elif failed is not None and failed.target == target:
            status, error = "degraded", failed.error
        else:
            status, error = "loading", None
        return {"status": status, "bundle": active.name, "version": active.bundle.manifest.get("version"),
                "variant": active.bundle.manifest.get("variant"), "runtime": active.runtime["runtime"],
                "loaded_at": active.loaded_at, "current": target, "error": error}


# ---------------------------------------------------------------------------------------------- inputs

_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_TENSORS: Dict[int, TypeAdapter[Any]] = {3: TypeAdapter(List[List[List[_Finite]]]), 4: TypeAdapter(List[List[List[List[_Finite]]]])}


class _TensorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: List[Any]


def _shape_text(shape: Tuple[int, int, int]) -> str:
    return f"[N,{','.join(map(str, shape))}] or [{','.join(map(str, shape))}]"


def tensor_from_json(body: bytes, shape: Tuple[int, int, int], max_batch: int) -> np.ndarray:
    """``{"inputs": [...]}`` -> float32 [N,C,H,W]; HTTPException with a one-line reason if it is not that."""
    try:
        inputs = _TensorBody.model_validate_json(body).inputs
    except ValidationError as err:
        invalid_json = err.errors()[0]["type"] == "json_invalid"
        raise HTTPException(400 if invalid_json else 422, f"body: {_first_error(err)}") from None
    depth, node = 0, inputs
    while isinstance(node, list):
        depth += 1
        if not node:
            break
        node = node[0]
    if depth not in _TENSORS:
        raise HTTPException(422, f"inputs: expected nested lists shaped {_shape_text(shape)}, got {depth} level(s)")
    if depth == 4 and len(inputs) > max_batch:
        raise HTTPException(413, f"inputs: batch of {len(inputs)} is larger than the limit {max_batch}")
    try:
        nested = _TENSORS[depth].validate_python(inputs)
    except ValidationError as err:
        e = err.errors()[0]
        where = "".join(f"[{p}]" for p in e["loc"])
        raise HTTPException(422, f"inputs{where}: {e['msg']}") from None
    try:
        with np.errstate(over="ignore"):  # a finite float64 beyond float32's range: reported below
            x = np.array(nested, dtype=np.float32)
    except ValueError:
        raise HTTPException(422, "inputs: ragged nested lists (rows of different lengths)") from None
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise HTTPException(422, f"inputs: expected shape {_shape_text(shape)}, got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise HTTPException(422, "inputs: values out of float32 range")
    return x


def tensor_from_images(images: List[bytes], pre: Preprocessing,
                       max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS) -> np.ndarray:
    """Image files -> a normalized float32 [N,C,H,W] batch. Every header is read first: the pixels of
    all the images together must stay within ``max_request_pixels`` before any of them is decoded."""
    names = ["file"] if len(images) == 1 else [f"file[{i}]" for i in range(len(images))]
    total = sum(_image_call(image_pixels, data, max_pixels=MAX_IMAGE_PIXELS, name=name)
                for data, name in zip(images, names, strict=True))
    if total > max_request_pixels:
        raise HTTPException(413, f"files: {len(images)} images of {total} pixels in all, more than the limit of "
                                 f"{max_request_pixels} pixels per request")
    return np.stack([tensor_from_image(data, pre, name) for data, name in zip(images, names, strict=True)])


def tensor_from_image(data: bytes, pre: Preprocessing, name: str = "file") -> np.ndarray:
    """Image bytes -> one normalized [C,H,W] float32 tensor, as the training data was made."""
    c, h, w = pre.input_shape
    mode = {1: "L", 3: "RGB"}.get(c)
    if mode is None:
        raise HTTPException(422, f"this model takes {c}-channel input, which no image has; send a tensor")
    # the decoder training used: same formats, EXIF rotation, bit-depth scaling, conversion and resize
    x = _image_call(decode_image, data, (h, w), mode, max_pixels=MAX_IMAGE_PIXELS, name=name)
    x = x.astype(np.float32) / np.float32(255.0)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    return ((x - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def _image_call(fn, data: bytes, *args, name: str, **kwargs):
    """``fn`` of :mod:`edgeopt.data.images` on uploaded bytes, its errors as HTTP statuses with its one line."""
    if not data:
        raise HTTPException(422, f"{name}: empty upload")
    try:
        return fn(data, *args, name=name, **kwargs)
    except ImageTooLarge as err:
        raise HTTPException(413, str(err)) from None
    except ImageFormatRefused as err:
        raise HTTPException(415, str(err)) from None
    except ImageError as err:
        raise HTTPException(422, str(err)) from None


# ---------------------------------------------------------------------------------------------- the app


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes``, by Content-Length and by the bytes really read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            reason = f"body of {declared} bytes is larger than the limit {self.max_bytes}"
            await JSONResponse({"detail": reason}, 413)(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, f"body is larger than the limit {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


class _SameOrigin:
    """ASGI middleware: refuse (403) a request whose Origin header names another site than its Host.
    Browsers send Origin with cross-site requests, so a page elsewhere cannot post to the server
    through a user's browser; programs (curl, httpx, the agent's clients) send none and pass."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and origin.partition("://")[2].lower() != headers.get("host", "").lower():
                reason = f"cross-origin request refused (Origin {origin[:100]!r})"
                await JSONResponse({"detail": reason}, 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _served(request: Request) -> LoadedBundle:
    """The bundle for this request (a dependency): reading it also notices a redeploy."""
    return request.app.state.store.get()


Credentials = Annotated[Optional[HTTPAuthorizationCredentials], Depends(HTTPBearer(auto_error=False))]
Served = Annotated[LoadedBundle, Depends(_served)]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def create_app(root: Path, *, token: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_batch: int = DEFAULT_MAX_BATCH, max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
               allowed_hosts: Optional[Sequence[str]] = None) -> FastAPI:
    """The app over ``root`` (a deploy folder); loads and verifies the current bundle now (ServeError if bad).

    ``allowed_hosts``: the Host header values accepted (400 for any other), or None for any.
    """
    store = ModelStore(root)
    app = FastAPI(title="edgeopt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_SameOrigin)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    slots = anyio.CapacityLimiter(DECODE_SLOTS)

    def token_ok(creds: Optional[HTTPAuthorizationCredentials]) -> bool:
        return token is None or (creds is not None and hmac.compare_digest(creds.credentials.encode(), token.encode()))

    async def authorized(creds: Credentials) -> None:
        if not token_ok(creds):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=400)  # nobody to answer: the client left (or was cut off) mid-request

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the server log"}, 500)

    @app.get("/health")
    async def health(creds: Credentials) -> Dict[str, Any]:
        """Status for anyone; with a token configured, the details only for its holders."""
        store.get()
        state = store.state()
        return state if token_ok(creds) else {"status": state["status"]}

    @app.get("/metadata", dependencies=[Depends(authorized)])
    async def metadata(m: Served) -> Dict[str, Any]:
        man = m.bundle.manifest
        return {"bundle": m.name, "version": man.get("version"), "variant": man.get("variant"),
                "registered_model": man.get("registered_model"), "metrics": man.get("metrics", {}),
                "labels": m.labels, "input_shape": list(m.input_shape), "runtime": m.runtime,
                "limits": {"max_body_bytes": max_body_bytes, "max_batch": max_batch,
                           "max_image_pixels": MAX_IMAGE_PIXELS, "max_request_pixels": max_request_pixels},
                "manifest": man}

    @app.post("/predict", dependencies=[Depends(authorized)])
    async def predict(request: Request, m: Served) -> Dict[str, Any]:
        media = _media_type(request)
        if media not in (JSON_TYPE, MULTIPART_TYPE):
            raise HTTPException(415, f"Content-Type must be {JSON_TYPE} (a tensor) or {MULTIPART_TYPE} "
                                     f"(an image in field 'file'), got {media or 'none'!r}")
        body = await request.body()
        if not body:
            raise HTTPException(400, "empty body")
        if media == JSON_TYPE:
            make_batch = partial(tensor_from_json, body, m.input_shape, max_batch)
        else:
            form = await request.form(max_files=max_batch, max_fields=16)
            uploads = form.getlist("file")
            if not uploads:
                raise HTTPException(422, "multipart body has no field 'file' (the image to classify)")
            files = [u for u in uploads if isinstance(u, UploadFile)]
            if len(files) != len(uploads):
                raise HTTPException(422, "field 'file' must be a file upload, not a text field")
            make_batch = partial(tensor_from_images, [await u.read() for u in files], m.pre, max_request_pixels)
        probs = await anyio.to_thread.run_sync(lambda: m.probabilities(make_batch()), limiter=slots)
        top = probs.argmax(axis=1)
        return {"bundle": m.name, "version": m.bundle.manifest.get("version"),
                "variant": m.bundle.manifest.get("variant"),
                "predictions": [{"label": m.labels[int(i)], "index": int(i), "probability": float(p[i]),
                                 "probabilities": p.tolist()} for i, p in zip(top, probs, strict=True)]}

    return app


# ---------------------------------------------------------------------------------------------- the server


class ReceiptTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for receiving each request in full.

    The clock starts when the connection opens and again when an answer has been sent; it stops
    when h11 has the whole request (headers and body). A client still sending when it runs out,
    however slowly it drips its bytes, is disconnected: uvicorn's own ``timeout_keep_alive`` only
    covers the idle time between requests and restarts on every byte received.
    """

    receipt_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    _deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.receipt_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.debug("closing a connection from %s: no complete request within %.1f s", self.client,
                      self.receipt_timeout)
            self.transport.close()


def receipt_timeout_protocol(seconds: float) -> type:
    """:class:`ReceiptTimeoutProtocol` with its deadline set to ``seconds``, for uvicorn's ``http=``."""
    return type("ReceiptTimeoutProtocol", (ReceiptTimeoutProtocol,), {"receipt_timeout": float(seconds)})


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: Optional[str]) -> None:
    """Refuse a token that could never match what a client sends (HTTP strips the spaces around a header
    value and carries non-ASCII text as Latin-1) or that is too short to guess."""
    if token is None:
        return
    if token != token.strip():
        raise ServeError("the token starts or ends with whitespace, which HTTP strips from the header: remove it")
    if not (token.isascii() and token.isprintable()):
        raise ServeError("the token must be printable ASCII (letters, digits, punctuation): HTTP headers carry "
                         "nothing else reliably")
    if len(token) < MIN_TOKEN_CHARS:
        raise ServeError(f"the token must be at least {MIN_TOKEN_CHARS} characters")


def check_bind(host: str, token: Optional[str], *, tls: bool = False, insecure: bool = False) -> None:
    """Refuse a bad token, any non-loopback address without a token, and a token sent off loopback in
    clear text (no TLS) unless ``insecure``."""
    check_token(token)
    if is_loopback(host):
        return
    if token is None:
        raise ServeError(f"refusing to serve on {host} (not loopback) without a token: set EDGEOPT_SERVE_TOKEN "
                         f"or pass --token, or bind 127.0.0.1")
    if not tls and not insecure:
        raise ServeError(f"refusing to send the token in clear text on {host} (not loopback): pass --ssl-certfile "
                         f"and --ssl-keyfile, or --insecure behind a TLS proxy you trust")


def allowed_hosts(host: str) -> Optional[List[str]]:
    """The Host header values a server bound to ``host`` accepts: loopback names on a loopback bind (a
    DNS-rebinding page sends its own name), None (any) otherwise."""
    if not is_loopback(host):
        return None
    bare = host.strip("[]")
    own = f"[{bare}]" if ":" in bare else bare
    return list(dict.fromkeys((*LOOPBACK_NAMES, own.lower())))


def check_tls(certfile: Optional[Path], keyfile: Optional[Path]) -> None:
    """Load the certificate and key once now, so that a bad pair fails in one line before the model loads."""
    if keyfile is not None and certfile is None:
        raise ServeError("--ssl-keyfile needs --ssl-certfile")
    if certfile is None:
        return
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is not None and not Path(path).is_file():
            raise ServeError(f"{flag} {path}: cannot load: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as err:
        what = f"--ssl-certfile {certfile}" + (f" / --ssl-keyfile {keyfile}" if keyfile else "")
        raise ServeError(f"{what}: cannot load the certificate and key ({err.strerror or err})") from None


def serve(root: Path, *, host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_batch: int = DEFAULT_MAX_BATCH,
          max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
          max_connections: int = DEFAULT_MAX_CONNECTIONS, ssl_certfile: Optional[Path] = None,
          ssl_keyfile: Optional[Path] = None, insecure: bool = False, access_log: bool = True) -> None:
    """Check the address, the token, the TLS files and the bundle, then serve until interrupted."""
    token = token or None
    check_bind(host, token, tls=ssl_certfile is not None, insecure=insecure)
    check_tls(ssl_certfile, ssl_keyfile)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(root, token=token, max_body_bytes=max_body_bytes, max_batch=max_batch,
                     max_request_pixels=max_request_pixels, allowed_hosts=allowed_hosts(host))
    log.info("serving %s from %s", app.state.store.active.name, root)
    uvicorn.run(app, host=host.strip("[]"), port=port, access_log=access_log, server_header=False,
                proxy_headers=False, http=receipt_timeout_protocol(request_timeout),
                limit_concurrency=max_connections, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
