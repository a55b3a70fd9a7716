"""Local inference server over a deploy folder: FastAPI served by uvicorn.

    GET  /health     status + the bundle being served (the status alone without the token, if one is set)
    GET  /metadata   version, variant, metrics, manifest, labels, runtime
    POST /predict    an image (multipart field ``file``, repeatable) or ``{"inputs": [...]}`` as JSON,
                     a normalized float tensor [N,C,H,W] or [C,H,W]; answers label, index and
                     softmax probabilities per item

The server serves ``<root>/current`` (:class:`edgeopt.serve.store.ModelStore`: a redeploy is
picked up while the old bundle goes on serving). Bad input is answered with a 4xx and
``{"detail": "<one line>"}`` (:mod:`edgeopt.serve.inputs`); the body size is checked against
Content-Length and against the bytes really read. A model output that is not finite is a 500 with
one line. With a token, every endpoint needs it (/health shows its status alone without it).

Limits below the app: the request-receipt deadline (:mod:`edgeopt.serve.protocol`); uvicorn's
``limit_concurrency`` caps the connections and requests in flight (503 beyond it); on a loopback
bind, Starlette's TrustedHostMiddleware answers 400 to a Host header that is not a loopback name
(DNS rebinding, :func:`edgeopt.serve.guard.allowed_hosts`), and a request whose Origin is another
site than its Host gets 403 (a web page posting through a browser).
"""

from __future__ import annotations

import hmac
import logging
import re
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Dict, Optional, Sequence

import anyio
import anyio.to_thread
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers, UploadFile
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from edgeopt.serve import ServeError
from edgeopt.serve.guard import allowed_hosts, check_bind, check_tls
from edgeopt.serve.inputs import DEFAULT_MAX_REQUEST_PIXELS, MAX_IMAGE_PIXELS, tensor_from_images, tensor_from_json
from edgeopt.serve.protocol import DEFAULT_REQUEST_TIMEOUT_S, receipt_timeout_protocol
from edgeopt.serve.store import LoadedBundle, ModelStore

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_CONNECTIONS = 64
DECODE_SLOTS = 4  # requests decoded and run at once (memory: about this many times the pixel budget)
JSON_TYPE, MULTIPART_TYPE = "application/json", "multipart/form-data"


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


MODEL_URI = re.compile(r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)@(?P<alias>[A-Za-z][A-Za-z0-9_-]*)")


def deploy_folder_for(model_uri: str, tracking_uri: str, under: Path) -> Path:
    """A deploy folder serving the version a registry alias names (``models:/<name>@<alias>``, MLflow's own
    URI), built from the registry alone (:func:`edgeopt.deploy.champion.deploy_from_registry`: the version's
    files, labels and preprocessing) under ``under/<name>@<alias>``; kept bundles are reused. The server
    serves that version: a later move of the alias is picked up by the next ``serve -m``."""
    m = MODEL_URI.fullmatch(model_uri.strip())
    if m is None:
        raise ServeError(f"{model_uri}: expected a registered model as models:/<name>@<alias>, e.g. "
                         "models:/edgeopt-digits@champion")
    from mlflow.exceptions import MlflowException

    from edgeopt.deploy.bundle import DeployError
    from edgeopt.deploy.champion import deploy_from_registry
    from edgeopt.track.uri import redact_uri

    root = Path(under) / f"{m['name']}@{m['alias']}"
    try:
        bundle = deploy_from_registry(uri=tracking_uri, name=m["name"], alias=m["alias"], root=root, keep=2)
    except (MlflowException, DeployError, LookupError, OSError, ValueError) as err:
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ServeError(f"{model_uri}: cannot be deployed from {redact_uri(tracking_uri)} ({text})") from None
    if bundle is None:
        raise ServeError(f"{model_uri}: no version of {m['name']} has the alias '{m['alias']}' in "
                         f"{redact_uri(tracking_uri)} (set MLFLOW_TRACKING_URI or --tracking-uri to the registry)")
    return root


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
