"""The inference server over real bundles: ONNX Runtime and OpenVINO run tiny models built here; its
limits (slow clients, connection cap, TLS, Host check, pixel budgets) against a real server process."""

import asyncio
import datetime
import io
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench.serve_load import (
    ROOT,
    bomb_client,
    bombs,
    deploy_tiny,
    drive,
    running_server,
    slow_headers,
    tiny_model_dir,
)
from edgeopt.config import DataConfig
from edgeopt.data.sources import load_dataset
from edgeopt.deploy.bundle import Bundle
from edgeopt.runtimes import make_predictor
from edgeopt.serve import ServeError
from edgeopt.serve.app import create_app
from edgeopt.serve.guard import allowed_hosts, check_bind, check_tls, check_token
from edgeopt.serve.inputs import tensor_from_image
from edgeopt.serve.store import Preprocessing
from edgeopt.track.runs import serving_info

TOKEN = "s3cret-token-for-tests-0123456789"
MAX_BODY, MAX_BATCH = 64 * 1024, 8
MEAN, STD = 0.5, 0.25  # what deploy_tiny writes as preprocessing
LIVE_TIMEOUT = 2.0  # the live server's request-receipt timeout, seconds


@pytest.fixture(scope="module")
def models():
    """Model folders: plain ONNX, ONNX that always says '3', IR that always says '7', and an RGB one."""
    return {
        "onnx": tiny_model_dir("onnx"),
        "onnx3": tiny_model_dir("onnx", favour=3),
        "ov7": tiny_model_dir("openvino", seed=1, favour=7),
        "rgb": tiny_model_dir("onnx", shape=(3, 16, 16), classes=4),
    }


@pytest.fixture(scope="module")
def root(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("served") / "deploy"
    deploy_tiny(root, models["onnx"], fmt="onnx", version="1")
    return root


@pytest.fixture(scope="module")
def client(root):
    with TestClient(create_app(root, max_body_bytes=MAX_BODY, max_batch=MAX_BATCH)) as c:
        yield c


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    """A self-signed certificate for localhost, 127.0.0.1 and ::1, and its key (PEM files)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:  # the openssl command line does the same
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"], check=True,
                       capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1"))]
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (with a correct CRC) claims ``width`` x ``height`` pixels."""
    raw = _png(np.zeros((1, 1), np.uint8))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + raw[24:29]
    return raw[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + raw[33:]


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _expected(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    runtime = json.loads((bundle.path / "runtime.json").read_text())["runtime"]
    return _softmax(make_predictor(runtime, bundle.model_file)(x.astype(np.float32)).astype(np.float64))


def _json(inputs) -> dict:
    return {"json": {"inputs": inputs}}


def _raw(body, ctype="application/json") -> dict:
    return {"content": body, "headers": {"content-type": ctype}}


def _files(*items) -> dict:
    return {"files": [("file", item) for item in items]}


def _wait_health(client, check, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = client.get("/health").json()
        if check(h) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def _link(root: Path, bundle_dir: Path) -> None:
    """Point ``current`` at ``bundle_dir`` the way a deployer does: a new link renamed over the old."""
    tmp = root / f".current-{uuid.uuid4().hex}"
    os.symlink(Path("versions") / bundle_dir.name, tmp)
    os.replace(tmp, root / "current")


# ------------------------------------------------------------------------------------------ answers


def test_tensor_predictions_are_the_runtimes_softmax(client, root):
    bundle = Bundle((root / "current").resolve())
    x = np.random.default_rng(0).normal(0, 1, (3, 1, 8, 8)).astype(np.float32)
    r = client.post("/predict", **_json(x.tolist()))
    assert r.status_code == 200, r.text
    body = r.json()
    probs = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(probs, _expected(bundle, x), atol=1e-5)
    assert [p["index"] for p in body["predictions"]] == probs.argmax(axis=1).tolist()
    assert [p["label"] for p in body["predictions"]] == [str(i) for i in probs.argmax(axis=1)]
    assert body["version"] == "1" and body["variant"] == "tiny-fp32-onnx"
    one = client.post("/predict", **_json(x[0].tolist())).json()["predictions"]  # [C,H,W] is a batch of one
    np.testing.assert_allclose(one[0]["probabilities"], probs[0], atol=1e-6)


def test_image_upload_is_preprocessed_like_the_training_data(client, root):
    bundle = Bundle((root / "current").resolve())
    rgb = np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    gray = np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8)
    r = client.post("/predict", **_files(("a.png", _png(rgb), "image/png"), ("b.png", _png(gray), "image/png")))
    assert r.status_code == 200, r.text
    want = [np.asarray(Image.fromarray(rgb).convert("L").resize((8, 8), Image.BILINEAR), np.float32), gray]
    x = np.stack([((np.asarray(a, np.float32) / 255.0 - MEAN) / STD)[None] for a in want])
    got = np.array([p["probabilities"] for p in r.json()["predictions"]])
    np.testing.assert_allclose(got, _expected(bundle, x), atol=1e-5)


def test_an_rgb_bundle_takes_grayscale_images_and_rgb_tensors(models, tmp_path):
    root = tmp_path / "deploy"
    deploy_tiny(root, models["rgb"], fmt="onnx", version="1", shape=(3, 16, 16), labels=["a", "b", "c", "d"])
    with TestClient(create_app(root)) as c:
        r = c.post("/predict", **_files(("g.png", _png(np.full((5, 7), 200, np.uint8)), "image/png")))
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] in "abcd"
        assert c.post("/predict", **_json(np.zeros((2, 3, 16, 16)).tolist())).status_code == 200
        assert c.post("/predict", **_json(np.zeros((1, 8, 8)).tolist())).status_code == 422


def test_an_openvino_bundle_is_served_with_openvino(models, tmp_path):
    root = tmp_path / "deploy"
    deploy_tiny(root, models["ov7"], fmt="openvino", version="4")
    with TestClient(create_app(root)) as c:
        meta = c.get("/metadata").json()
        assert meta["runtime"]["runtime"] == "openvino" and meta["runtime"]["precision"]
        assert meta["manifest"]["model_file"] == "model.xml"
        r = c.post("/predict", **_json(np.zeros((2, 1, 8, 8)).tolist()))
        assert [p["label"] for p in r.json()["predictions"]] == ["7", "7"]


def test_health_and_metadata(client, root):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["error"] is None and h["runtime"] == "onnxruntime"
    assert h["bundle"] == (root / "current").resolve().name and h["current"] == os.readlink(root / "current")
    m = client.get("/metadata").json()
    assert m["version"] == "1" and m["variant"] == "tiny-fp32-onnx" and m["registered_model"] == "tiny"
    assert m["labels"] == [str(i) for i in range(10)] and m["input_shape"] == [1, 8, 8]
    assert m["metrics"] == {"accuracy": 0.5} and m["manifest"]["files"]["model.onnx"]["sha256"]
    assert m["limits"] == {"max_body_bytes": MAX_BODY, "max_batch": MAX_BATCH, "max_image_pixels": 4096 * 4096,
                           "max_request_pixels": 2 * 4096 * 4096}


# ------------------------------------------------------------------------------------------ bad requests

GOOD = np.zeros((1, 1, 8, 8)).tolist()
ROW = np.zeros((1, 8, 8)).tolist()
PNG = _png(np.zeros((8, 8), np.uint8))
BIG = _png_claiming(20000, 20000)  # a 1x1 image claiming 400 megapixels: it fails differently if ever decoded
ICO = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(BIG), 22) + BIG
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{} loop\n"  # Ghostscript would loop for ever

BAD_REQUESTS = [
    # (id, method, path, request kwargs, status, words in the detail)
    ("shape-wrong-width", "post", "/predict", _json(np.zeros((1, 1, 8, 7)).tolist()), 422, "expected shape"),
    ("shape-wrong-channels", "post", "/predict", _json(np.zeros((2, 8, 8)).tolist()), 422, "expected shape"),
    ("shape-2d", "post", "/predict", _json(np.zeros((8, 8)).tolist()), 422, "2 level"),
    ("shape-5d", "post", "/predict", _json(np.zeros((1, 1, 1, 8, 8)).tolist()), 422, "5 level"),
    ("shape-empty-rows", "post", "/predict", _json([[[[]]]]), 422, "expected shape"),
    ("ragged", "post", "/predict", _json([[ROW[0][:4] + [[0.0] * 7] + ROW[0][5:]]]), 422, "ragged"),
    ("inputs-empty", "post", "/predict", _json([]), 422, "1 level"),
    ("inputs-not-a-list", "post", "/predict", _json(3.0), 422, "valid array"),
    ("dtype-strings", "post", "/predict", _json([[["0"] * 8] * 8]), 422, "valid number"),
    ("dtype-bools", "post", "/predict", _json([[[True] + [0.0] * 7] * 8]), 422, "inputs[0][0][0]"),
    ("dtype-null", "post", "/predict", _json([[[None] * 8] * 8]), 422, "valid number"),
    ("dtype-objects", "post", "/predict", _json([[[{"v": 1}] * 8] * 8]), 422, "valid number"),
    ("nan", "post", "/predict", _raw(b'{"inputs": [[[NaN' + b", 0" * 7 + b"]" + b", [0,0,0,0,0,0,0,0]" * 7 + b"]]}"),
     422, "finite"),
    ("infinity", "post", "/predict", _raw(json.dumps({"inputs": [[[float("inf")] * 8] * 8]}).encode()), 422,
     "finite"),
    ("overflow-float64", "post", "/predict", _raw(b'{"inputs": [[[1e400' + b", 0" * 7 + b"]" +
                                                  b", [0,0,0,0,0,0,0,0]" * 7 + b"]]}"), 422, "finite"),
    ("overflow-float32", "post", "/predict", _json([[[1e39] * 8] * 8]), 422, "float32 range"),
    ("batch-too-large", "post", "/predict", _json(np.zeros((MAX_BATCH + 1, 1, 8, 8)).tolist()), 413, "batch of 9"),
    ("body-too-large", "post", "/predict", _raw(b" " * (MAX_BODY + 1)), 413, "larger than the limit"),
    ("body-too-large-chunked", "post", "/predict", _raw(iter([b" " * 4096] * 17)), 413, "larger than the limit"),
    ("body-empty", "post", "/predict", _raw(b""), 400, "empty body"),
    ("json-invalid", "post", "/predict", _raw(b'{"inputs": [1, 2'), 400, "Invalid JSON"),
    ("json-not-utf8", "post", "/predict", _raw(b'{"inputs": "\xff\xfe"}'), 400, "Invalid JSON"),
    ("json-too-deep", "post", "/predict", _raw(b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 400,
     "recursion"),
    ("json-array-body", "post", "/predict", _raw(json.dumps(GOOD).encode()), 422, "be an object"),
    ("field-missing", "post", "/predict", {"json": {"input": GOOD}}, 422, "inputs: Field required"),
    ("field-unknown", "post", "/predict", {"json": {"inputs": GOOD, "extra": 1}}, 422, "extra: Extra inputs"),
    ("content-type-text", "post", "/predict", _raw(b"hello", "text/plain"), 415, "Content-Type must be"),
    ("content-type-none", "post", "/predict", {"content": json.dumps({"inputs": GOOD}).encode()}, 415, "none"),
    ("content-type-image", "post", "/predict", _raw(PNG, "image/png"), 415, "multipart/form-data"),
    ("multipart-no-file", "post", "/predict", {"files": {"image": ("x.png", PNG, "image/png")}}, 422,
     "no field 'file'"),
    ("multipart-file-is-text", "post", "/predict", {"data": {"file": "hello"}, "files": {"x": ("x", b"1")}}, 422,
     "not a text field"),
    ("multipart-no-boundary", "post", "/predict", _raw(b"--x\r\n\r\n", "multipart/form-data"), 400, "boundary"),
    ("multipart-too-many-files", "post", "/predict", _files(*[("x.png", PNG, "image/png")] * (MAX_BATCH + 1)), 400,
     "Too many files"),
    ("image-not-an-image", "post", "/predict", _files(("x.png", b"not an image at all", "image/png")), 422,
     "not a readable image"),
    ("image-truncated", "post", "/predict", _files(("x.png", PNG[:40], "image/png")), 422, "not a readable image"),
    ("image-empty", "post", "/predict", _files(("x.png", b"", "image/png")), 422, "empty upload"),
    ("image-too-many-pixels", "post", "/predict", _files(("x.png", _png_claiming(5000, 5000), "image/png")), 413,
     "5000x5000"),
    ("image-ico-refused", "post", "/predict", _files(("x.ico", ICO, "image/x-icon")), 415, "ICO files are refused"),
    ("image-eps-refused", "post", "/predict", _files(("x.png", EPS, "image/png")), 415, "EPS files are refused"),
    ("image-psd-refused", "post", "/predict", _files(("x.psd", b"8BPS\x00\x01" + bytes(40), "image/png")), 415,
     "PSD files are refused"),
    ("image-broken-png", "post", "/predict", _files(("x.png", PNG[:12], "image/png")), 422, "a broken PNG file"),
    ("images-over-request-budget", "post", "/predict",
     _files(*[("x.png", _png_claiming(4000, 4000), "image/png")] * 3), 413, "48000000 pixels in all"),
    ("image-second-empty", "post", "/predict", _files(("a.png", PNG, "image/png"), ("b.png", b"", "image/png")), 422,
     "file[1]: empty upload"),
    ("output-not-finite", "post", "/predict", _json([[[3e38, -3e38] * 4] * 8]), 500, "not finite"),
    ("method-get-predict", "get", "/predict", {}, 405, "Method Not Allowed"),
    ("unknown-path", "get", "/admin", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("method,path,request_kwargs,status,words", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_one_line_and_the_server_stays_healthy(client, method, path, request_kwargs, status,
                                                                words):
    r = getattr(client, method)(path, **request_kwargs) if method == "get" else \
        client.request("POST", path, **request_kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail, detail
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/predict", **_json(GOOD)).status_code == 200


# ------------------------------------------------------------------------------------------ bad bundles


def _rehash(bundle_dir: Path) -> None:
    """Re-write the manifest's sha256s, so that a broken file passes verification and fails later."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    Bundle.write(bundle_dir, {k: v for k, v in manifest.items() if k not in ("kind", "files")})


def _edit_json(name, change, rehash=True):
    def breaker(b: Path):
        (b / name).write_text(json.dumps(change(json.loads((b / name).read_text()))))
        if rehash:
            _rehash(b)
    return breaker


def _write(name, data: bytes, rehash=True):
    def breaker(b: Path):
        (b / name).write_bytes(data)
        if rehash:
            _rehash(b)
    return breaker


def _manifest(change):
    def breaker(b: Path):
        m = json.loads((b / "manifest.json").read_text())
        change(m)
        (b / "manifest.json").write_text(json.dumps(m))
    return breaker


BAD_BUNDLES = [
    # (id, break the bundle folder, words in the one-line error)
    ("folder-gone", lambda b: shutil.rmtree(b), "FileNotFoundError"),
    ("manifest-missing", lambda b: (b / "manifest.json").unlink(), "manifest.json"),
    ("manifest-not-json", _write("manifest.json", b"{oops", rehash=False), "JSONDecodeError"),
    ("manifest-wrong-kind", _manifest(lambda m: m.update(kind="model")), "expected 'bundle'"),
    ("model-missing", lambda b: (b / "model.onnx").unlink(), "model.onnx listed in the manifest is missing"),
    ("model-tampered", _write("model.onnx", b"tampered", rehash=False), "does not match its sha256"),
    ("model-garbage", _write("model.onnx", b"\x00garbage" * 10), "model.onnx"),
    ("runtime-unknown", _edit_json("runtime.json", lambda r: {**r, "runtime": "tensorrt"}),
     "unknown runtime 'tensorrt'"),
    ("runtime-threads-zero", _edit_json("runtime.json", lambda r: {**r, "threads": 0}), "runtime.json: threads"),
    ("runtime-not-json", _write("runtime.json", b"onnxruntime"), "runtime.json: Invalid JSON"),
    ("runtime-json-missing-key", _edit_json("runtime.json", lambda r: {"threads": 1}), "runtime: Field required"),
    ("labels-too-few", _edit_json("labels.json", lambda labels: labels[:5]), "names 5 classes"),
    ("labels-not-strings", _edit_json("labels.json", lambda labels: list(range(10))), "labels.json: 0"),
    ("labels-empty", _edit_json("labels.json", lambda labels: []), "labels.json"),
    ("preprocessing-missing", _manifest(lambda m: m.pop("preprocessing")), "has no 'preprocessing'"),
    ("preprocessing-mean-per-channel", _manifest(lambda m: m["preprocessing"].update(mean=[0.1, 0.2])),
     "one value per channel"),
    ("preprocessing-std-zero", _manifest(lambda m: m["preprocessing"].update(std=[0.0])), "std.0"),
    ("preprocessing-shape-wrong", _manifest(lambda m: m["preprocessing"].update(input_shape=[1, 9, 9])),
     "does not run on a [1,1,9,9] input"),
]


@pytest.mark.parametrize("breaker,words", [c[1:] for c in BAD_BUNDLES], ids=[c[0] for c in BAD_BUNDLES])
def test_a_bad_bundle_fails_at_start_in_one_line_and_is_not_swapped_in_later(models, tmp_path, breaker, words):
    root = tmp_path / "deploy"
    bad = deploy_tiny(root, models["onnx"], fmt="onnx", version="9").path
    good = deploy_tiny(root, models["onnx3"], fmt="onnx", version="1").path
    breaker(bad)

    _link(root, bad)
    with pytest.raises(ServeError) as err:
        create_app(root)
    msg = str(err.value)
    assert "\n" not in msg and bad.name in msg and (words is None or words in msg), msg

    _link(root, good)
    with TestClient(create_app(root)) as c:
        _link(root, bad)
        h = _wait_health(c, lambda h: h["status"] == "degraded")
        assert h["status"] == "degraded" and h["bundle"] == good.name and "\n" not in h["error"], h
        assert words is None or words in h["error"]
        r = c.post("/predict", **_json(GOOD))
        assert r.status_code == 200 and r.json()["version"] == "1" and r.json()["predictions"][0]["label"] == "3"
        _link(root, good)
        assert c.get("/health").json()["status"] == "ok"


def test_startup_errors_for_the_deploy_folder(models, tmp_path):
    with pytest.raises(ServeError, match="deploy folder not found"):
        create_app(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match="no 'current' bundle"):
        create_app(tmp_path / "empty")


def test_the_cli_reports_a_bad_bundle_in_one_line(models, tmp_path):
    root = tmp_path / "deploy"
    bundle = deploy_tiny(root, models["onnx"], fmt="onnx", version="1")
    (bundle.path / "model.onnx").write_bytes(b"tampered")
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "serve", "--deploy-root", str(root), "--port", "9"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("edgeopt: error: ") and "does not match its sha256" in r.stderr


# ------------------------------------------------------------------------------------------ safety


def test_token_guards_every_endpoint_but_health(root):
    with TestClient(create_app(root, token=TOKEN)) as c:
        assert c.get("/health").json() == {"status": "ok"}  # the details are for token holders
        assert c.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()["bundle"]
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):
            for r in (c.get("/metadata", headers=headers), c.post("/predict", headers=headers, **_json(GOOD)),
                      c.post("/predict", content=b"junk", headers={**headers, "content-type": "application/json"})):
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
                assert "Authorization: Bearer" in r.json()["detail"]
        ok = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/metadata", headers=ok).status_code == 200
        assert c.post("/predict", headers=ok, **_json(GOOD)).status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_token_and_no_tls(host):
    check_bind(host, None)
    check_bind(host, TOKEN)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com"])
def test_any_other_address_needs_a_token_and_tls_or_insecure(host):
    with pytest.raises(ServeError, match="not loopback.*without a token"):
        check_bind(host, None, tls=True)
    with pytest.raises(ServeError, match="token in clear text.*--ssl-certfile"):
        check_bind(host, TOKEN)
    check_bind(host, TOKEN, tls=True)
    check_bind(host, TOKEN, insecure=True)


@pytest.mark.parametrize("token,words", [
    ("short", "at least 16 characters"),
    (" 0123456789abcdefgh", "whitespace"),
    ("0123456789abcdefgh\n", "whitespace"),
    ("pässwörd-0123456789", "printable ASCII"),
    ("0123456789\x00abcdefgh", "printable ASCII"),
])
def test_a_token_that_could_never_match_is_refused_at_startup(token, words):
    with pytest.raises(ServeError, match=words):
        check_token(token)


def test_tls_files_are_checked_before_the_model_loads(tmp_path, tls_pair):
    cert, key = tls_pair
    check_tls(cert, key)
    check_tls(None, None)
    with pytest.raises(ServeError, match="--ssl-keyfile needs --ssl-certfile"):
        check_tls(None, key)
    with pytest.raises(ServeError, match=r"^--ssl-certfile .*nowhere.pem: cannot load: no such file$"):
        check_tls(tmp_path / "nowhere.pem", key)
    with pytest.raises(ServeError, match=r"^--ssl-keyfile .*nowhere.key: cannot load: no such file$"):
        check_tls(cert, tmp_path / "nowhere.key")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ServeError, match="junk.pem .*cannot load the certificate and key") as err:
        check_tls(tmp_path / "junk.pem", key)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args,env_token,words", [
    (["--host", "0.0.0.0"], None, "without a token"),
    (["--host", "0.0.0.0"], TOKEN, "token in clear text"),
    (["--host", "127.0.0.1"], "pässwörd-0123456789", "printable ASCII"),
    (["--host", "127.0.0.1", "--ssl-certfile", "/nonexistent/cert.pem"], None, "/nonexistent/cert.pem: cannot load"),
])
def test_the_cli_refuses_an_unsafe_bind_in_one_line(root, args, env_token, words):
    env = {k: v for k, v in os.environ.items() if k != "EDGEOPT_SERVE_TOKEN"}
    if env_token is not None:
        env["EDGEOPT_SERVE_TOKEN"] = env_token
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "serve", "--deploy-root", str(root), "--port", "9",
                        *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("edgeopt: error: ") and "Traceback" not in r.stderr, r.stderr
    assert words in r.stderr.splitlines()[-1], r.stderr


def test_a_loopback_server_answers_only_loopback_host_names(root):
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("192.168.1.10") is None
    assert allowed_hosts("[::1]") == allowed_hosts("::1") == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("127.0.0.2") == ["localhost", "127.0.0.1", "[::1]", "127.0.0.2"]
    app = create_app(root, allowed_hosts=allowed_hosts("127.0.0.1"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert c.post("/predict", headers={"Host": host}, **_json(GOOD)).status_code == 200, host
        for host in ("attacker.example:8000", "127.0.0.1.attacker.example", "evil.localhost", "[::2]:8000"):
            for r in (c.get("/metadata", headers={"Host": host}),
                      c.post("/predict", headers={"Host": host}, **_json(GOOD))):
                assert r.status_code == 400 and r.text == "Invalid host header", (host, r.text)


def test_a_page_on_another_site_cannot_post_through_a_browser(client):
    assert client.post("/predict", headers={"Origin": "http://testserver"}, **_json(GOOD)).status_code == 200
    for origin in ("https://attacker.example", "null", "http://testserver.attacker.example", "http://testserver:81"):
        r = client.post("/predict", headers={"Origin": origin}, **_json(GOOD))
        assert r.status_code == 403 and r.json()["detail"].startswith("cross-origin request refused"), (origin, r.text)


# ------------------------------------------------------------------------------------------ reload


def test_a_redeploy_is_swapped_in_without_failing_a_request(models, tmp_path):
    root = tmp_path / "deploy"
    old = deploy_tiny(root, models["onnx3"], fmt="onnx", version="1")
    with TestClient(create_app(root)) as c:
        assert c.post("/predict", **_json(GOOD)).json()["predictions"][0]["label"] == "3"
        new = deploy_tiny(root, models["ov7"], fmt="openvino", version="2")
        answers = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = c.post("/predict", **_json(GOOD))
            assert r.status_code == 200, r.text
            answers.add((r.json()["version"], r.json()["predictions"][0]["label"]))
            if r.json()["version"] == "2":
                break
        assert answers <= {("1", "3"), ("2", "7")} and ("2", "7") in answers, answers
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["bundle"] == new.path.name != old.path.name and h["runtime"] == "openvino"
        assert c.get("/metadata").json()["variant"] == "tiny-fp32-openvino"


def test_a_bundle_that_failed_to_load_is_tried_again(models, tmp_path):
    """The rsync case: ``current`` arrives before the bundle it points at; once the bundle is there, it is served."""
    root = tmp_path / "deploy"
    old = deploy_tiny(root, models["onnx3"], fmt="onnx", version="1")
    new = deploy_tiny(root, models["ov7"], fmt="openvino", version="2")
    held = tmp_path / "in-transit"
    new.path.rename(held)
    _link(root, old.path)
    with TestClient(create_app(root)) as c:
        _link(root, new.path)  # dangling, for now
        h = _wait_health(c, lambda h: h["status"] == "degraded")
        assert h["status"] == "degraded" and h["bundle"] == old.path.name and "FileNotFoundError" in h["error"], h
        assert c.post("/predict", **_json(GOOD)).json()["predictions"][0]["label"] == "3"
        held.rename(new.path)
        h = _wait_health(c, lambda h: h["status"] == "ok")
        assert h["status"] == "ok" and h["bundle"] == new.path.name and h["error"] is None, h
        assert c.post("/predict", **_json(GOOD)).json()["predictions"][0]["label"] == "7"


# ------------------------------------------------------------------------------------------ one decoder


def _training_and_serving_files(root: Path) -> list:
    """Two classes of images in every accepted format and the awkward modes, each image distinct."""
    rng = np.random.default_rng(7)
    files = []
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        photo = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
        exif = Image.Exif()
        exif[0x0112] = 6  # stored sideways: upright only if the decoder applies the orientation
        images = {
            "rotated.jpg": (Image.fromarray(photo), {"exif": exif, "quality": 95}),
            "deep.png": (Image.fromarray(rng.integers(0, 65536, (20, 24)).astype(np.uint16)), {}),
            "palette.png": (Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), {}),
            "alpha.png": (Image.fromarray(np.dstack([photo, rng.integers(0, 256, (30, 44), dtype=np.uint8)])), {}),
            "large.bmp": (Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)), {}),
            "float.tif": (Image.fromarray(rng.random((16, 16)).astype(np.float32), "F"), {}),
            "gray.webp": (Image.fromarray(rng.integers(0, 256, (10, 14), dtype=np.uint8)), {"lossless": True}),
            "frame.gif": (Image.fromarray(photo).convert("P"), {}),
        }
        for name, (im, kwargs) in images.items():
            im.save(root / cls / name, **kwargs)
            files.append(root / cls / name)
    return files


@pytest.mark.parametrize("grayscale,resize", [(False, "stretch"), (True, "stretch"), (False, "center_crop")],
                         ids=["rgb", "gray", "rgb-center-crop"])
def test_training_and_serving_make_the_same_tensor_from_the_same_file(tmp_path, grayscale, resize):
    """The server's tensor of an uploaded file is the dataset's row of that file, with the preprocessing the
    run's serving info gives a bundle's manifest.json: ``data.resize: center_crop`` included, so a centre-crop
    model is served the centre it was evaluated on, where a stretch would squash the image."""
    files = _training_and_serving_files(tmp_path / "imgs")
    ds = load_dataset(DataConfig(source="imagefolder", root=tmp_path / "imgs", image_size=(12, 16),
                                 grayscale=grayscale, resize=resize), seed=0, cache_dir=tmp_path / "cache")
    trained = np.concatenate([ds.split(name)[0] for name in ("train", "val", "test")])
    assert len(trained) == len(files)
    manifest = json.loads(json.dumps(serving_info(ds.manifest)))  # through JSON, as the bundle's manifest holds it
    pre = Preprocessing.model_validate(manifest["preprocessing"])  # as the server's store reads it
    assert pre.resize.crop == (0.875 if resize == "center_crop" else None)
    stretched = Preprocessing(input_shape=ds.input_shape, mean=ds.manifest["mean"], std=ds.manifest["std"])
    assert stretched.resize.crop is None  # a bundle from before resize was recorded stretches, as runs then did
    rows = set()
    for path in files:
        served = tensor_from_image(path.read_bytes(), pre)
        same = [i for i, x in enumerate(trained) if x.dtype == served.dtype and np.array_equal(x, served)]
        assert len(same) == 1, f"{path.name}: {len(same)} identical training rows"
        rows.add(same[0])
        if resize == "center_crop":
            assert not np.array_equal(tensor_from_image(path.read_bytes(), stretched), served), path.name
    assert len(rows) == len(files)


# ------------------------------------------------------------------------------------------ real HTTP


@pytest.fixture(scope="module")
def live(models, tmp_path_factory):
    """``run.py serve`` in a subprocess on 127.0.0.1 (a free port) over a bundle that says '3', with a
    short request-receipt timeout and a cap of 4 connections."""
    root = tmp_path_factory.mktemp("live") / "deploy"
    deploy_tiny(root, models["onnx3"], fmt="onnx", version="1")
    with running_server(root, args=["--max-body-bytes", str(MAX_BODY), "--request-timeout", str(LIVE_TIMEOUT),
                                    "--max-connections", "4"]) as server:
        yield server


@pytest.mark.slow  # a live uvicorn server
def test_a_real_server_answers_over_http(live):
    with httpx.Client(base_url=live.base, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        r = http.post("/predict", **_json(GOOD))
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "3"
        r = http.post("/predict", **_files(("x.png", PNG, "image/png")))
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "3"
        assert http.post("/predict", **_raw(b" " * (MAX_BODY + 1))).status_code == 413
        assert http.post("/predict", **_raw(iter([b" " * 4096] * 17))).status_code == 413
        assert http.post("/predict", **_raw(b"[")).status_code == 400
        r = http.post("/predict", **_files(("x.ico", ICO, "image/x-icon")))
        assert r.status_code == 415 and "ICO files are refused" in r.json()["detail"]
        r = http.get("/metadata", headers={"Host": f"attacker.example:{live.port}"})  # DNS rebinding
        assert r.status_code == 400 and r.text == "Invalid host header"
        assert http.get("/health").json()["status"] == "ok"


def _until_dropped(sock: socket.socket, drip: bytes, limit: float, t0: float) -> float:
    """Send ``drip`` every 0.2 s (as a slowloris does) until the server closes the socket; seconds since ``t0``."""
    sock.settimeout(0.2)
    while time.monotonic() - t0 < limit:
        try:
            if sock.recv(1024) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            try:
                sock.sendall(drip)
            except OSError:
                return time.monotonic() - t0
        except OSError:
            return time.monotonic() - t0
    return float("inf")


@pytest.mark.slow  # a live uvicorn server
@pytest.mark.parametrize("start,drip", [
    (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: 1\r\n"),
    (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: 100000\r\n\r\n{\"inputs\": ", b" "),
], ids=["headers", "body"])
def test_a_client_that_never_finishes_its_request_is_dropped_within_the_timeout(live, start, drip):
    t0 = time.monotonic()  # before connecting: the server's clock starts later, so ``took`` >= its timeout
    with socket.create_connection((live.host, live.port)) as sock:
        sock.sendall(start)
        took = _until_dropped(sock, drip, limit=15, t0=t0)
    assert LIVE_TIMEOUT - 0.05 <= took < LIVE_TIMEOUT + 4, f"dropped after {took:.2f} s (timeout {LIVE_TIMEOUT} s)"
    assert httpx.get(f"{live.base}/health", timeout=10).json()["status"] == "ok"


@pytest.mark.slow  # a live uvicorn server
def test_connections_beyond_the_cap_get_503_until_idle_ones_time_out(live):
    t0 = time.monotonic()
    idle = [socket.create_connection((live.host, live.port)) for _ in range(3)]  # with the next one: the cap, 4
    try:
        time.sleep(0.3)
        r = httpx.get(f"{live.base}/health", timeout=10)
        assert r.status_code == 503 and r.text == "Service Unavailable"
        assert all(_until_dropped(s, b"", limit=15, t0=t0) < LIVE_TIMEOUT + 4 for s in idle)  # the timeout frees them
        assert httpx.get(f"{live.base}/health", timeout=10).status_code == 200
    finally:
        for s in idle:
            s.close()


@pytest.mark.slow  # a live uvicorn server
def test_tls_on_ipv6_loopback_with_a_token(models, tmp_path, tls_pair):
    cert, key = tls_pair
    root = tmp_path / "deploy"
    deploy_tiny(root, models["onnx3"], fmt="onnx", version="1")
    with running_server(root, host="[::1]", token=TOKEN, certfile=cert, keyfile=key) as server:
        assert server.base.startswith("https://[::1]:")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.base, verify=server.verify, timeout=30) as https:
            r = https.post("/predict", headers=auth, **_json(GOOD))
            assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "3"
            assert https.post("/predict", **_json(GOOD)).status_code == 401
            assert https.get("/health", headers={**auth, "Host": "attacker.example"}).status_code == 400
            assert https.get("/health", headers={**auth, "Host": "localhost"}).json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{server.base}/health", timeout=10)  # a client that does not trust the certificate
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://[::1]:{server.port}/health", timeout=10)  # no plain HTTP on the TLS port


@pytest.mark.slow  # a load test
def test_load_under_attack_across_a_redeploy_has_no_error(models, tmp_path):
    """bench/serve_load.py's loop for 5 s, a new bundle deployed half-way, the slow-header and bomb clients
    alongside (request timeout 1 s here): zero errors for the normal clients, every attack answered."""
    root = tmp_path / "deploy"
    deploy_tiny(root, models["onnx3"], fmt="onnx", version="1")
    kinds = bombs()
    with running_server(root, args=["--request-timeout", "1"]) as server:
        result = asyncio.run(drive(
            server.base, duration=5, max_requests=20_000, clients=4,
            redeploy=lambda: deploy_tiny(root, models["ov7"], fmt="openvino", version="2"),
            expected_labels={"1": "3", "2": "7"},
            attackers={"slow": lambda stop: slow_headers(server.host, server.port, stop, sockets=4, drip_s=0.25),
                       "bombs": lambda stop: bomb_client(server.base, stop, kinds)},
            await_switch_s=60,
        ))
        peak = server.peak_rss()
    assert result["errors"] == 0, result["error_samples"]
    assert result["served"].get("1", 0) > 0 and result["served"].get("2", 0) > 0, result
    assert result["switch_s"] is not None and result["requests"] > 20
    slow, bomb = result["attacks"]["slow"], result["attacks"]["bombs"]
    assert slow["dropped"] >= 4 and slow["longest_s"] < 1 + 4, slow
    assert bomb["unexpected"] == 0 and len(bomb["sent"]) == len(kinds), bomb
    assert peak < 1 << 30
