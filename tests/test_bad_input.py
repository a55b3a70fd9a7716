"""The bad-input corpus: what a user gets wrong (the config file, the data, a brought model, the tracking
store, the deploy folder, a deploy folder handed to the server), each with the exact one-line error the CLI
ends with, its exit code, and no traceback on the terminal.

Almost every case is refused by the pre-flight (before any step starts, nothing trained), through the
real CLI in this process (click's runner) or, for one case of each kind, as the real command in a
subprocess. The cases that can only show once a step runs (an image that decodes badly, a model whose
output is wrong only when run) run the real pipeline and are marked ``slow``.
"""

import http.server
import os
import pickle
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import edgeopt.plan.preflight
from edgeopt.config import MAX_CONFIG_BYTES
from edgeopt.data.images import MAX_PIXELS
from edgeopt_zenml.cli import cli
from tests._tiny import ROOT

RUN_PY = str(ROOT / "run.py")


def base_config(tmp: Path) -> dict:
    """A valid run that trains nothing big; every case breaks one thing in it."""
    return {
        "name": "bad-input",
        "data": {"source": "digits"},
        "teacher": {"arch": "small_cnn", "width": 4, "epochs": 1},
        "variants": {"bases": ["teacher"], "quantization": ["fp32"], "formats": ["onnx"], "runtimes": ["onnxruntime"]},
        "target": {"warmup": 1, "iterations": 10},
        "registry": {"name": "bad-input"},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "bad-input"},
        "deploy": {"root": str(tmp / "deploy")},
    }


def write(tmp: Path, raw, name: str = "run.yaml") -> Path:
    path = tmp / name
    path.write_text(raw if isinstance(raw, str) else yaml.dump(raw, Dumper=yaml.CSafeDumper))
    return path


def with_(raw: dict, dotted: str, value) -> dict:
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node[k] = dict(node.get(k) or {})
        node = node[k]
    node[keys[-1]] = value
    return raw


def cli_in_process(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def cli_subprocess(*args: str, env=None, timeout=120):
    out = subprocess.run([sys.executable, RUN_PY, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    return out.returncode, out.stdout, out.stderr


def assert_refused(got, expected, code: int = 2):
    """Exit ``code``, the last line is ``edgeopt: error: <expected>`` (a string, or a compiled pattern that
    must match it whole), and no traceback anywhere."""
    rc, stdout, stderr = got
    assert "Traceback" not in stdout + stderr, stdout + stderr
    lines = stderr.strip().splitlines()
    assert lines, f"nothing on stderr (exit {rc}); stdout: {stdout[-500:]}"
    last = lines[-1]
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(last.removeprefix("edgeopt: error: ")), last
    else:
        assert last == f"edgeopt: error: {expected}"
    assert last.startswith("edgeopt: error: ") and len(last) < 700
    assert rc == code, (rc, stderr)


# ---------------------------------------------------------------------------------------------- configs

def _deep(tmp, n):
    return "seed: " + "[" * n + "]" * n + "\n"


BOMB = "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB


@pytest.mark.parametrize("case, text, expected", [
    ("binary", b"\x00\x01\x02edgeopt\x00", "{p}: a binary file, not a YAML config"),
    ("latin-1", "name: caf\xe9\n".encode("latin-1"), "{p}: not UTF-8 text (byte 9): not a YAML config"),
    ("too large", b"# " + b"x" * MAX_CONFIG_BYTES + b"\n", "{p}: larger than 1024 KiB: not a run config"),
    ("alias bomb", BOMB.encode(), "{p}: expands to more than 100000 values (YAML aliases): not a run config"),
    ("nested 3000 deep", _deep(None, 3000).encode(), "{p}: nested deeper than 32 levels: not a run config"),
    ("nested 40 deep", _deep(None, 40).encode(), "{p}: nested deeper than 32 levels: not a run config"),
    ("unclosed bracket", b"teacher: [unclosed\n", "{p}: line 2: not valid YAML (did not find expected ',' or ']')"),
    ("tab indent", b"teacher:\n\tarch: x\n", "{p}: line 2: not valid YAML (found character that cannot start any token)"),
    ("empty", b"", "{p}: empty config"),
    ("only a comment", b"# nothing\n", "{p}: empty config"),
    ("a list", b"- name: x\n", "{p}: expected a mapping at the top level, got list"),
    ("a scalar", b"just words\n", "{p}: expected a mapping at the top level, got str"),
    ("python tag", b"name: !!python/object/apply:os.system ['true']\n",
     re.compile(r".*/run\.yaml: line 1: not valid YAML \(could not determine a constructor for the tag "
                r"'tag:yaml\.org,2002:python/object/apply:os\.system'\)")),
])
def test_config_files_that_are_not_configs(tmp_path, case, text, expected):
    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    if isinstance(expected, str):
        expected = expected.format(p=path)
    assert_refused(cli_in_process("validate", "-c", str(path)), expected)


def test_config_paths_that_are_not_files(tmp_path):
    assert_refused(cli_in_process("validate", "-c", str(tmp_path)), f"{tmp_path}: is a folder, not a config file")
    missing = tmp_path / "nope.yaml"
    assert_refused(cli_in_process("run", "-c", str(missing)), f"{missing}: config file not found")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert_refused(cli_in_process("validate", "-c", str(fifo)), f"{fifo}: not a regular file")


@pytest.mark.parametrize("dotted, value, expected", [
    ("target.threads", -2, "target.threads: Input should be greater than or equal to 1 (got -2)"),
    ("teacher.archh", "x", "teacher.archh: unknown field"),
    ("teacher.arch", "resnet9000", "teacher.arch: unknown architecture 'resnet9000'; expected one of small_cnn, "
                                   "resnet_small, resnet18, mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, "
                                   "shufflenet_v2_x0_5, shufflenet_v2_x1_0, squeezenet1_1, efficientnet_b0 "
                                   "(got 'resnet9000')"),
    ("data.image_size", [100000, 100000], "data.image_size: each side must be at most 2048 pixels (got [100000, 100000])"),
    ("data.image_size", [2, 2], "data.image_size: each side must be at least 4 pixels (got [2, 2])"),
    ("data.image_size", [32], "data.image_size.1: Field required"),
    ("data.mean", [0.5], "data.mean and data.std go together: set both or neither"),
    ("data.source", "imagenet", "data.source: Input should be 'digits' or 'imagefolder' (got 'imagenet')"),
    ("tracking.experiment", "../../../escape", "tracking.experiment: String should match pattern "
                                               "'^[A-Za-z0-9][A-Za-z0-9 _.-]*$' (got '../../../escape')"),
    ("tracking.experiment", "/escape", "tracking.experiment: String should match pattern "
                                       "'^[A-Za-z0-9][A-Za-z0-9 _.-]*$' (got '/escape')"),
    ("tracking.uri", "sqlite:///mlflow.db", "tracking.uri: a relative SQLite path depends on the working directory; "
                                            "write it absolute (sqlite:////abs/path/mlflow.db) or leave tracking.uri "
                                            "unset (got 'sqlite:///mlflow.db')"),
    ("tracking.uri", "file:./mlruns", "tracking.uri: MLflow 3 refuses file stores; use sqlite:///path/mlflow.db or an "
                                      "http(s):// server (got 'file:./mlruns')"),
    ("name", "my run!", "name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]*$' (got 'my run!')"),
    ("seed", -1, "seed: Input should be greater than or equal to 0 (got -1)"),
    ("seed", "zero", "seed: Input should be a valid integer, unable to parse string as an integer (got 'zero')"),
    ("variants.bases", ["teacher", "teacher"], "variants.bases: duplicate entries in ['teacher', 'teacher'] "
                                               "(got ['teacher', 'teacher'])"),
    ("variants.bases", ["student"], "variants.bases names 'student' but there is no student section"),
    ("variants.quantization", ["int3"], re.compile(r".*/run\.yaml: variants\.quantization\.0: unknown precision "
                                                   r"'int3'.* \(got 'int3'\)")),
    ("teacher.onnx", "no/such/model.onnx", "teacher.onnx: file not found: no/such/model.onnx"),
    ("teacher.checkpoint", "weights.h5", "teacher.checkpoint: expected a .pt/.pth/.safetensors file, got weights.h5"),
    ("data.root", "~/edgeopt-no-such-folder", "data.root is required when data.source is 'imagefolder'"),
    ("name", "x" * 100_000, "name: String should have at most 100 characters (got '" + "x" * 27 + "..." + "x" * 28 + "')"),
    ("variants.quantization", ["bogus"] * 50_000, "variants.quantization: at most 32 entries, got 50000 (got ['bogus', "
                                                  "'bogus', 'bogus', 'bogus', ...])"),
])
def test_bad_fields_name_the_field_in_one_bounded_line(tmp_path, dotted, value, expected):
    raw = with_(base_config(tmp_path), dotted, value)
    if dotted == "data.root":
        raw["data"]["source"] = "imagefolder"
        raw["data"].pop("root")
    path = write(tmp_path, raw)
    if isinstance(expected, str):
        expected = f"{path}: {expected}"
    assert_refused(cli_in_process("validate", "-c", str(path)), expected)


def test_home_is_expanded_in_paths(tmp_path, monkeypatch):
    """``~`` means the home folder in every path of the config (not a folder named '~' in the checkout)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _classes(tmp_path / "home" / "imgs", {"a": 8, "b": 8})
    raw = base_config(tmp_path)
    raw["data"] = {"source": "imagefolder", "root": "~/imgs"}
    raw["deploy"]["root"] = "~/deploy"
    rc, out, err = cli_in_process("validate", "-c", str(write(tmp_path, raw)))
    assert rc == 0, err
    raw["data"]["root"] = "~/missing"
    path = write(tmp_path, raw)
    assert_refused(cli_in_process("validate", "-c", str(path)), f"{path}: data.root: folder not found: ~/missing")


# ---------------------------------------------------------------------------------------------- datasets

def _classes(root: Path, counts: dict, size=(12, 12), suffix=".png") -> Path:
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (40 * i % 255, 90, 200)).save(root / c / f"{i}{suffix}")
    return root


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (a few bytes: a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _data_case(root: Path, case: str):
    """Break an otherwise good two-class folder; return what the error names (relative to ``root``)."""
    counts = {"cat": 4, "dog": 4}
    if case == "too few":
        counts["dog"] = 2
    if case in ("empty root", "presplit extra", "presplit differ", "presplit one"):
        counts = {}
    _classes(root, counts)
    if case == "one class":
        for p in (root / "dog").iterdir():
            p.unlink()
        (root / "dog").rmdir()
    elif case == "empty class":
        (root / "bird").mkdir()
    elif case == "only hidden":
        (root / "bird").mkdir()
        Image.new("RGB", (12, 12)).save(root / "bird" / ".hidden.png")
    elif case == "zero bytes":
        (root / "cat" / "zero.png").write_bytes(b"")
    elif case == "corrupt jpeg":
        (root / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif case == "truncated png":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "x.png")
        (root / "cat" / "cut.png").write_bytes((root / "x.png").read_bytes()[:3000])
        (root / "x.png").unlink()
    elif case == "text as png":
        (root / "cat" / "notes.png").write_text("these are my notes, not a picture")
    elif case == "eps as png":
        (root / "cat" / "art.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{} loop\n")
    elif case == "header over the limit":
        (root / "cat" / "big.png").write_bytes(_png_claiming(9000, 8000))
    elif case == "huge header":
        (root / "cat" / "bomb.png").write_bytes(_png_claiming(20000, 20000))
    elif case == "presplit extra":
        _classes(root / "train", {"cat": 3, "dog": 3})
        _classes(root / "test", {"cat": 1, "dog": 1})
        (root / "extra").mkdir()
    elif case == "presplit differ":
        _classes(root / "train", {"cat": 3, "dog": 3})
        _classes(root / "test", {"cat": 1, "fox": 1})
    elif case == "presplit one":
        _classes(root / "train", {"cat": 3, "dog": 1})
        _classes(root / "test", {"cat": 1, "dog": 1})


@pytest.mark.parametrize("case, expected", [
    ("one class", "{r}: an ImageFolder needs at least two class folders, found 1"),
    ("empty root", "{r}: an ImageFolder needs at least two class folders, found 0"),
    ("empty class", "{r}/bird: class folder holds no image (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)"),
    ("only hidden", "{r}/bird: class folder holds no image (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)"),
    ("zero bytes", "{r}/cat/zero.png: empty file (0 bytes)"),
    ("corrupt jpeg", "{r}/cat/bad.jpg: not a readable image (OSError: Truncated File Read)"),
    ("truncated png", "{r}/cat/cut.png: not a readable image (OSError: Truncated File Read)"),
    ("text as png", "{r}/cat/notes.png: not a readable image (not one of PNG, JPEG, BMP, GIF, WEBP, TIFF)"),
    ("eps as png", "{r}/cat/art.png: not a readable image (not one of PNG, JPEG, BMP, GIF, WEBP, TIFF)"),
    ("huge header", f"{{r}}/cat/bomb.png: image larger than {MAX_PIXELS} pixels"),
    ("header over the limit", f"{{r}}/cat/big.png: image of 9000x8000 pixels is larger than {MAX_PIXELS} pixels"),
    ("too few", "{r}/dog: 2 image(s); each class needs at least 3 (one each for train, val and test)"),
    ("presplit extra", "{r}: has train/ and test/ (a pre-split layout) and also extra/: move each into a split or out "
                       "of the root"),
    ("presplit differ", "{r}/test: class folders differ from {r}/train's (missing dog; extra fox)"),
    ("presplit one", "{r}/train/dog: 1 image; carving a validation split out of train needs at least 2 per class (or "
                     "add a val/ folder)"),
])
def test_data_problems_are_found_before_any_step(tmp_path, case, expected):
    root = tmp_path / "imgs"
    root.mkdir()
    _data_case(root, case)
    raw = with_(base_config(tmp_path), "data", {"source": "imagefolder", "root": str(root)})
    assert_refused(cli_in_process("validate", "-c", str(write(tmp_path, raw))), expected.format(r=root))


def test_data_mean_must_match_the_channels(tmp_path):
    root = _classes(tmp_path / "imgs", {"a": 3, "b": 3})
    raw = with_(base_config(tmp_path), "data", {"source": "imagefolder", "root": str(root), "mean": [0.5], "std": [0.2]})
    assert_refused(cli_in_process("validate", "-c", str(write(tmp_path, raw))),
                   "data.mean has 1 values, the images have 3 channel(s)")


def test_data_root_that_is_a_file(tmp_path):
    (tmp_path / "imgs").write_text("not a folder")
    raw = with_(base_config(tmp_path), "data", {"source": "imagefolder", "root": str(tmp_path / "imgs")})
    path = write(tmp_path, raw)
    assert_refused(cli_in_process("validate", "-c", str(path)),
                   f"{path}: data.root: not a folder: {tmp_path / 'imgs'}")


# ------------------------------------------------------------------------------------- brought models

def _onnx(path: Path, *, inputs=None, out_dims=("N", 10), opset=17, elem=TensorProto.FLOAT, custom=False,
          in_dims=("N", 1, 8, 8)) -> Path:
    """A tiny classifier (flatten + matmul) with the given interface."""
    feats = int(np.prod([d for d in in_dims[1:] if isinstance(d, int)]))
    classes = out_dims[-1] if isinstance(out_dims[-1], int) else 10
    w = numpy_helper.from_array(np.zeros((feats, classes), np.float32), "w")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])]
    if custom:
        nodes.append(helper.make_node("Magic", ["y"], ["z"], domain="com.example"))
    ins = inputs or [helper.make_tensor_value_info("x", elem, list(in_dims))]
    outs = [helper.make_tensor_value_info("z" if custom else "y", TensorProto.FLOAT, list(out_dims))]
    graph = helper.make_graph(nodes, "g", ins, outs, [w])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.example", 1)] if custom else [])
    onnx.save(helper.make_model(graph, opset_imports=imports, ir_version=8), str(path))
    return path


def _brought(tmp: Path, case: str) -> Path:
    p = tmp / "model.onnx"
    if case == "truncated":
        _onnx(p)
        p.write_bytes(p.read_bytes()[:40])
    elif case == "text":
        p.write_text("this is not a model")
    elif case == "two inputs":
        _onnx(p, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8]),
                         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1])])
    elif case == "custom op":
        _onnx(p, custom=True)
    elif case == "5 classes":
        _onnx(p, out_dims=("N", 5))
    elif case == "float16 input":
        _onnx(p, elem=TensorProto.FLOAT16)
    elif case == "channels last":
        _onnx(p, in_dims=("N", 8, 8, 1))
    elif case == "opset 11":
        _onnx(p, opset=11)
    elif case == "16x16 input":
        _onnx(p, in_dims=("N", 1, 16, 16))
    elif case == "rank-3 output":
        _onnx(p, out_dims=("N", 2, 10))
    elif case == "3 channels":
        _onnx(p, in_dims=("N", 3, 8, 8))
    return p


@pytest.mark.parametrize("case, expected", [
    ("truncated", re.compile(r"\S+/model\.onnx: not a valid ONNX model \(.{5,260}\)")),
    ("text", re.compile(r"\S+/model\.onnx: not a valid ONNX model \(.{5,260}\)")),
    ("two inputs", "{p}: 2 inputs (x, mask): edgeopt takes single-input image classifiers"),
    ("custom op", "{p}: custom operator com.example::Magic: the runtimes cannot run it"),
    ("5 classes", "{p}: output 'y' has 5 classes; the dataset has 10"),
    ("float16 input", "{p}: input 'x' is float16: edgeopt feeds float32 normalized images (NCHW); move the cast and "
                      "normalization out of the model"),
    ("channels last", "{p}: input 'x' ['N', 8, 8, 1] looks channels-last (NHWC): edgeopt feeds NCHW; re-export with "
                      "the channels first"),
    ("opset 11", "{p}: opset 11 is not supported (edgeopt takes opsets 13 to 21; re-export with opset_version=17)"),
    ("16x16 input", "{p}: input 'x' ['N', 1, 16, 16] does not fit the data's images [N, 1, 8, 8] (axis 2: 16 vs 8)"),
    ("rank-3 output", "{p}: output 'y' has shape ['N', 2, 10]: expected [N, classes] (logits or probabilities)"),
    ("3 channels", "{p}: input 'x' ['N', 3, 8, 8] does not fit the data's images [N, 1, 8, 8] (axis 1: 3 vs 1)"),
])
def test_brought_onnx_models_are_refused_up_front(tmp_path, case, expected):
    model = _brought(tmp_path, case)
    raw = base_config(tmp_path)
    raw["teacher"] = {"onnx": str(model)}
    got = cli_in_process("validate", "-c", str(write(tmp_path, raw)))
    assert_refused(got, expected if isinstance(expected, re.Pattern) else expected.format(p=model))


class _Payload:
    """Unpickled, it would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_brought_state_dicts_are_loaded_up_front(tmp_path):
    import torch

    from edgeopt.models.zoo import build_model

    raw = base_config(tmp_path)
    cases = []
    pickled = tmp_path / "payload.pt"
    pwned = tmp_path / "pwned"
    pickled.write_bytes(pickle.dumps({"w": _Payload(pwned)}))
    cases.append((pickled, re.compile(rf"{re.escape(str(pickled))}: not a loadable state dict \(UnpicklingError: .+\)")))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(100))
    cases.append((garbage, re.compile(rf"{re.escape(str(garbage))}: not a loadable state dict \(\w+: .+\)")))
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    cases.append((listed, f"{listed}: expected a state dict (name -> tensor), got list"))
    other = tmp_path / "resnet.pt"
    torch.save(build_model("resnet_small", 10, 1, 4).state_dict(), other)
    cases.append((other, re.compile(rf"{re.escape(str(other))}: does not fit teacher\.arch=small_cnn with 10 classes "
                                    r"and 1 input channels: .+")))
    for path, expected in cases:
        raw["teacher"] = {"arch": "small_cnn", "width": 4, "checkpoint": str(path)}
        assert_refused(cli_in_process("validate", "-c", str(write(tmp_path, raw))), expected)
    assert not pwned.exists()

    raw["teacher"] = {"arch": "small_cnn", "width": 4, "epochs": 1}
    raw["student"] = {"arch": "small_cnn", "width": 4, "checkpoint": str(other)}
    raw["variants"]["bases"] = ["teacher", "student"]
    assert_refused(cli_in_process("validate", "-c", str(write(tmp_path, raw))),
                   re.compile(rf"{re.escape(str(other))}: only \d+ of the model's \d+ tensors match the file by name "
                              r"and shape .+: is it a state dict for this architecture\?"))


# ------------------------------------------------------------------------------------ tracking store

class _Answer(http.server.BaseHTTPRequestHandler):
    status, body = 500, b"oops"

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_answering():
    servers = []

    def start(status: int, body: bytes) -> str:
        handler = type("H", (_Answer,), {"status": status, "body": body})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_servers_that_cannot_work(tmp_path, http_answering, monkeypatch):
    raw = base_config(tmp_path)

    def refused(uri, expected):
        raw["tracking"]["uri"] = uri
        assert_refused(cli_in_process("validate", "-c", str(write(tmp_path, raw))), expected)

    port = _closed_port()
    refused(f"http://127.0.0.1:{port}", f"tracking.uri: http://127.0.0.1:{port}: the tracking server does not answer "
                                        "within 5 s (Connection refused)")
    refused(f"https://alice:s3cret@127.0.0.1:{port}/", f"tracking.uri: https://***@127.0.0.1:{port}/: the tracking "
                                                       "server does not answer within 5 s (Connection refused)")
    url = http_answering(500, b"internal error")
    refused(url, f"tracking.uri: {url}: not an MLflow tracking server (HTTP 500 on /api/2.0/mlflow/experiments/get-by-name)")
    url = http_answering(401, b"")
    refused(url, f"tracking.uri: {url}: the tracking server refused the request (HTTP 401); set "
                 "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    url = http_answering(404, b"<html>Not Found</html>")
    refused(url, f"tracking.uri: {url}: not an MLflow tracking server (HTTP 404 on /api/2.0/mlflow/experiments/get-by-name)")
    refused(f"postgresql://u:pw@127.0.0.1:{port}/mlflow",
            f"tracking.uri: postgresql://***@127.0.0.1:{port}/mlflow: the database server does not answer (Connection refused)")

    silent = socket.socket()  # accepts connections (the kernel's backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setattr(edgeopt.plan.preflight, "TRACKING_TIMEOUT_S", 0.5)
    try:
        refused(f"http://127.0.0.1:{silent.getsockname()[1]}",
                f"tracking.uri: http://127.0.0.1:{silent.getsockname()[1]}: the tracking server does not answer "
                "within 0.5 s (timed out)")
    finally:
        silent.close()


def test_an_mlflow_error_answer_counts_as_a_server(tmp_path, http_answering):
    """A 404 with MLflow's JSON error (the experiment does not exist yet) is a working server."""
    url = http_answering(404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no experiment"}')
    raw = base_config(tmp_path)
    raw["tracking"]["uri"] = url
    rc, out, err = cli_in_process("validate", "-c", str(write(tmp_path, raw)))
    assert rc == 0 and "ok (1 variants of teacher" in out, err


def test_sqlite_stores_that_cannot_work(tmp_path):
    raw = base_config(tmp_path)

    def refused(uri, expected):
        raw["tracking"]["uri"] = uri
        assert_refused(cli_in_process("validate", "-c", str(write(tmp_path, raw))), expected)

    (tmp_path / "dbdir").mkdir()
    refused(f"sqlite:///{tmp_path / 'dbdir'}", f"tracking.uri: {tmp_path / 'dbdir'}: is a folder, not an SQLite database file")
    (tmp_path / "notes.db").write_text("my notes")
    refused(f"sqlite:///{tmp_path / 'notes.db'}", f"tracking.uri: {tmp_path / 'notes.db'}: not an SQLite database")
    (tmp_path / "afile").write_text("x")
    refused(f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}",
            f"tracking.uri: {tmp_path / 'afile' / 'mlflow.db'}: cannot be made, {tmp_path / 'afile'} is a file")


# ------------------------------------------------------------------------------------- deploy folder

def test_deploy_roots_that_cannot_work(tmp_path):
    raw = base_config(tmp_path)
    (tmp_path / "deployed").write_text("a file")
    raw["deploy"]["root"] = str(tmp_path / "deployed")
    assert_refused(cli_in_process("validate", "-c", str(write(tmp_path, raw))),
                   f"deploy.root: {tmp_path / 'deployed'}: is a file, not a folder")
    raw["deploy"]["root"] = str(tmp_path / "deployed" / "digits")
    assert_refused(cli_in_process("validate", "-c", str(write(tmp_path, raw))),
                   f"deploy.root: {tmp_path / 'deployed' / 'digits'}: cannot be made, {tmp_path / 'deployed'} is a file")


# ------------------------------------------------------------------- deploy folders handed to the server

def test_serving_a_deploy_folder_with_nothing_to_serve(tmp_path):
    assert_refused(cli_in_process("serve", "--deploy-root", str(tmp_path / "none")),
                   f"{tmp_path / 'none'}: deploy folder not found")
    (tmp_path / "empty").mkdir()
    assert_refused(cli_in_process("serve", "--deploy-root", str(tmp_path / "empty")),
                   f"{tmp_path / 'empty'}: no 'current' bundle (nothing deployed yet: run `edgeopt run`)")
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "current").symlink_to("versions/gone")
    assert_refused(cli_in_process("serve", "--deploy-root", str(tmp_path / "dangling")),
                   re.compile(rf"{re.escape(str(tmp_path / 'dangling'))}.*"))


# ------------------------------------------------------------------- the real command, in a subprocess

def test_the_real_command_ends_with_the_same_line(tmp_path):
    """One case of each kind through ``python run.py run`` itself: what the terminal shows."""
    raw = base_config(tmp_path)
    (tmp_path / "folder.yaml").mkdir()
    assert_refused(cli_subprocess("run", "-c", str(tmp_path / "folder.yaml")),
                   f"{tmp_path / 'folder.yaml'}: is a folder, not a config file")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert_refused(cli_subprocess("run", "-c", str(bomb)),
                   f"{bomb}: expands to more than 100000 values (YAML aliases): not a run config")
    root = tmp_path / "imgs"
    root.mkdir()
    _data_case(root, "one class")
    path = write(tmp_path, with_(base_config(tmp_path), "data", {"source": "imagefolder", "root": str(root)}))
    assert_refused(cli_subprocess("run", "-c", str(path)), f"{root}: an ImageFolder needs at least two class folders, found 1")
    raw["teacher"] = {"onnx": str(_brought(tmp_path, "5 classes"))}
    assert_refused(cli_subprocess("run", "-c", str(write(tmp_path, raw))),
                   f"{tmp_path / 'model.onnx'}: output 'y' has 5 classes; the dataset has 10")
    raw = base_config(tmp_path)
    raw["tracking"]["uri"] = f"http://127.0.0.1:{_closed_port()}"
    port = raw["tracking"]["uri"].rsplit(":", 1)[1]
    assert_refused(cli_subprocess("run", "-c", str(write(tmp_path, raw))),
                   f"tracking.uri: http://127.0.0.1:{port}: the tracking server does not answer within 5 s (Connection refused)")
    raw = base_config(tmp_path)
    (tmp_path / "deployed").write_text("a file")
    raw["deploy"]["root"] = str(tmp_path / "deployed")
    assert_refused(cli_subprocess("run", "-c", str(write(tmp_path, raw))),
                   f"deploy.root: {tmp_path / 'deployed'}: is a file, not a folder")


# --------------------------------------------------------------------- failures only a run can show

@pytest.fixture(scope="module")
def run_state(tmp_path_factory):
    """One ZenML and edgeopt state for the failing runs (ZenML initializes a store once, in seconds)."""
    return tmp_path_factory.mktemp("failing-runs")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated jpeg", "sizes differ", "wrong classes at run time"])
def test_a_failed_step_ends_with_its_own_error(tmp_path, run_state, case):
    """Pre-flight passes; a step fails. The last line is that step's error, the traceback is in the log the
    line before names, the exit code is 1, and the run's work folders are gone from the temp dir."""
    raw = base_config(tmp_path)
    root = tmp_path / "imgs"
    if case == "truncated jpeg":
        _classes(root, {"cat": 4, "dog": 4}, suffix=".jpg")
        data = (root / "cat" / "0.jpg").read_bytes()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "cat" / "c.jpg")
        (root / "cat" / "c.jpg").write_bytes((root / "cat" / "c.jpg").read_bytes()[:len(data)])
        raw["data"] = {"source": "imagefolder", "root": str(root)}
        expected = re.compile(rf"load_data: {re.escape(str(root / 'cat' / 'c.jpg'))}: not a readable image \(OSError: .+\)")
    elif case == "sizes differ":
        _classes(root, {"cat": 4, "dog": 4})
        Image.new("RGB", (20, 10)).save(root / "dog" / "odd.png")
        raw["data"] = {"source": "imagefolder", "root": str(root)}
        expected = (f"load_data: {root / 'dog' / 'odd.png'}: 20x10 pixels, but {root / 'cat' / '0.png'} has 12x12; "
                    "set data.image_size to resize every image to one size")
    else:
        model = _onnx(tmp_path / "model.onnx", out_dims=("N", "classes"))
        w = onnx.load(str(model))
        w.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((64, 5), np.float32), "w"))
        onnx.save(w, str(model))
        raw["teacher"] = {"onnx": str(model)}
        expected = f"train_teacher: {model}: output shape [5] does not fit 10 classes"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "EDGEOPT_STATE_DIR": str(run_state / "edgeopt"), "ZENML_CONFIG_PATH": str(run_state / "zenml")}
    rc, out, err = got = cli_subprocess("run", "-c", str(write(tmp_path, raw)), env=env, timeout=600)
    assert_refused(got, expected, code=1)
    log_line = err.strip().splitlines()[-2]
    assert log_line.startswith("edgeopt: the run failed; its log, with the traceback: ")
    log = Path(log_line.rsplit(": ", 1)[1])
    assert log.parent == run_state / "edgeopt" / "logs" and "Traceback (most recent call last)" in log.read_text()
    assert not list(tmp.glob("edgeopt-*")), list(tmp.iterdir())
