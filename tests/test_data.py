"""Data at scale: the uint8 on-disk Dataset, streamed batches, the decode cache, pre-split trees,
and the one image decoder (formats, pixel limit, EXIF orientation, 16-bit scaling)."""

import io
import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeopt.config import DataConfig
from edgeopt.data.images import ImageError, ImageTooLarge, decode_image
from edgeopt.data.sources import DataError, load_dataset
from examples.make_shapes import make_shapes


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="imagefolder", root=root, **kw)


@pytest.fixture(scope="module")
def shapes_ds(tmp_path_factory):
    root = make_shapes(tmp_path_factory.mktemp("shapes"), per_class=20, size=20, suffix=".jpg", noise=8)
    return load_dataset(_cfg(root, image_size=(16, 12)), seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def test_streamed_batches_are_the_split(shapes_ds):
    ds = shapes_ds
    x, y = ds.split("train")
    assert x.dtype == np.float32 and x.shape == (ds.size("train"), 3, 16, 12) and y.dtype == np.int64
    streamed = list(ds.batches("train", 7))
    assert [len(b[1]) for b in streamed[:-1]] == [7] * (len(streamed) - 1)
    assert np.array_equal(np.concatenate([b[0] for b in streamed]), x)
    assert np.array_equal(np.concatenate([b[1] for b in streamed]), y)
    assert np.array_equal(ds.labels("train"), y)

    raw = ds.raw("train")
    perm = np.random.default_rng(3).permutation(len(y))[:20]
    shuffled = list(ds.batches("train", 8, shuffle=True, seed=3, normalized=False, limit=20))
    assert [len(b[1]) for b in shuffled] == [8, 8, 4]
    for k, (xb, yb) in enumerate(shuffled):
        idx = np.sort(perm[8 * k: 8 * (k + 1)])
        assert xb.dtype == np.uint8 and np.array_equal(xb, raw[idx]) and np.array_equal(yb, y[idx])
    assert np.array_equal(ds.normalize(raw[:5]), x[:5])
    again = [b[1] for b in ds.batches("train", 8, shuffle=True, seed=3, limit=20)]
    assert all(np.array_equal(a, b[1]) for a, b in zip(again, shuffled))


def test_images_are_stored_as_uint8_with_the_train_split_statistics(shapes_ds):
    ds = shapes_ds
    raw = ds.raw("test")
    assert isinstance(raw, np.memmap) and raw.dtype == np.uint8 and raw.shape == (ds.size("test"), 3, 16, 12)
    assert ds.manifest["files"]["images_test.npy"]["bytes"] < raw.size + 256  # a byte a pixel (+ header), not four
    assert sum(ds.size(s) for s in ("train", "val", "test")) == 60
    assert ds.scale == 255.0 and ds.mean.shape == ds.std.shape == (3,) and ds.mean.dtype == np.float32
    train = ds.raw("train").astype(np.float64) / 255
    assert np.allclose(ds.mean, train.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(ds.std, train.std(axis=(0, 2, 3)), atol=1e-5)


def test_sample_is_seeded_and_without_replacement(shapes_ds):
    ds = shapes_ds
    a, b = ds.sample("train", 10, seed=1), ds.sample("train", 10, seed=1)
    assert a.dtype == np.float32 and a.shape == (10, 3, 16, 12) and np.array_equal(a, b)
    assert len({row.tobytes() for row in a}) == 10
    assert not np.array_equal(a, ds.sample("train", 10, seed=2))
    assert len(ds.sample("val", 10_000)) == ds.size("val")
    x, _ = ds.split("train")  # the same draw as quantization's calibration_subset over the whole split
    assert np.array_equal(a, x[np.sort(np.random.default_rng(1).permutation(len(x))[:10])])


def test_digits_resize_to_image_size(tmp_path):
    big = load_dataset(DataConfig(source="digits", image_size=(32, 24)), seed=0, cache_dir=tmp_path)
    assert big.input_shape == [1, 32, 24] and big.raw("train").max() <= 16 and big.scale == 16.0
    assert big.data_hash != load_dataset(DataConfig(source="digits"), seed=0, cache_dir=tmp_path).data_hash


def test_digits_keep_their_exact_values(digits):
    raw = digits.raw("train")
    assert raw.dtype == np.uint8 and raw.max() == 16 and digits.scale == 16.0
    x, _ = digits.split("train")
    expected = ((raw.astype(np.float32) / np.float32(16) - digits.mean[:, None, None]) / digits.std[:, None, None])
    assert np.array_equal(x, expected.astype(np.float32))


def test_decode_cache_is_reused_and_follows_the_bytes(tmp_path, caplog):
    root = make_shapes(tmp_path / "imgs", per_class=6, size=16)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="edgeopt.data.sources")
    first = load_dataset(_cfg(root), seed=0, cache_dir=cache)
    assert "decoded 18, from cache 0" in caplog.text
    entries = list(cache.glob("decoded-*"))
    assert len(entries) == 1
    stamp = (entries[0] / "images.npy").stat().st_mtime_ns
    caplog.clear()
    second = load_dataset(_cfg(root), seed=0, cache_dir=cache)
    assert "decoded 0, from cache 18" in caplog.text
    assert (entries[0] / "images.npy").stat().st_mtime_ns == stamp and list(cache.glob("decoded-*")) == entries
    assert second.content_hash == first.content_hash and second.data_hash == first.data_hash

    Image.new("RGB", (16, 16), (255, 0, 0)).save(root / "circle" / "circle_000.png")
    caplog.clear()
    third = load_dataset(_cfg(root), seed=0, cache_dir=cache)
    assert "decoded 18, from cache 0" in caplog.text and third.data_hash != first.data_hash
    caplog.clear()
    gray = load_dataset(_cfg(root, grayscale=True), seed=0, cache_dir=cache)
    assert "decoded 18, from cache 0" in caplog.text and len(list(cache.glob("decoded-*"))) == 3
    assert gray.input_shape == [1, 16, 16] and gray.raw("val").shape[1:] == (1, 16, 16)


def _presplit(root: Path, with_val: bool) -> Path:
    make_shapes(root / "train", per_class=8, size=16, seed=0)
    make_shapes(root / "test", per_class=3, size=16, seed=1)
    for p in (root / "test").rglob("*.png"):  # mark the test images: a white top-left pixel
        im = Image.open(p).convert("RGB")
        im.putpixel((0, 0), (255, 255, 255))
        im.save(p)
    if with_val:
        make_shapes(root / "val", per_class=2, size=16, seed=2)
    return root


@pytest.mark.parametrize("with_val", [False, True])
def test_a_presplit_tree_is_honoured(tmp_path, with_val):
    root = _presplit(tmp_path / "tree", with_val)
    ds = load_dataset(_cfg(root, split={"val": 0.25, "test": 0.25}), seed=0, cache_dir=tmp_path / "cache")
    assert ds.manifest["layout"] == "pre-split" and ds.classes == ["circle", "square", "triangle"]
    assert ds.size("test") == 9 and np.bincount(ds.labels("test")).tolist() == [3, 3, 3]
    assert ds.size("train") + ds.size("val") == 24 + (6 if with_val else 0)
    assert ds.size("val") == 6  # given (2 per class), or carved: 0.25 of 24, stratified
    assert np.bincount(ds.labels("val")).tolist() == [2, 2, 2]
    marked = lambda split: (ds.raw(split)[:, :, 0, 0] == 255).all(axis=1)  # noqa: E731
    assert marked("test").all() and not marked("train").any() and not marked("val").any()


def test_a_presplit_tree_must_agree_on_classes(tmp_path):
    root = _presplit(tmp_path / "tree", with_val=False)
    (root / "test" / "hexagon").mkdir()
    Image.new("RGB", (16, 16)).save(root / "test" / "hexagon" / "h.png")
    with pytest.raises(DataError, match=r"tree/test: class folders differ from .*tree/train's \(extra hexagon\)"):
        load_dataset(_cfg(root), seed=0, cache_dir=tmp_path / "cache")
    (root / "test" / "hexagon" / "h.png").unlink()
    (root / "test" / "hexagon").rmdir()
    (root / "extra").mkdir()
    with pytest.raises(DataError, match=r"tree: has train/ and test/ \(a pre-split layout\) and also extra/"):
        load_dataset(_cfg(root), seed=0, cache_dir=tmp_path / "cache")


def _solid(path: Path, size=(16, 16), color=(10, 200, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.mark.parametrize("case, pattern", [
    ("one class", r"imgs: an ImageFolder needs at least two class folders, found 1"),
    ("empty class", r"imgs/empty: class folder holds no image"),
    ("zero bytes", r"imgs/a/zero.png: empty file \(0 bytes\)"),
    ("corrupt", r"imgs/a/corrupt.jpg: not a readable image"),
    ("truncated", r"imgs/a/cut.png: not a readable image \(OSError"),
    ("too few", r"imgs/b: 2 image\(s\); each class needs at least 3"),
    ("sizes differ", r"imgs/b/odd.png: 20x10 pixels, but .*imgs/a/0.png has 16x16; set data.image_size"),
])
def test_data_errors_name_the_file_or_folder(tmp_path, case, pattern):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        for i in range(2 if case == "too few" and c == "b" else 4):
            _solid(root / c / f"{i}.png")
    if case == "one class":
        for p in (root / "b").iterdir():
            p.unlink()
        (root / "b").rmdir()
    elif case == "empty class":
        (root / "empty").mkdir()
    elif case == "zero bytes":
        (root / "a" / "zero.png").write_bytes(b"")
    elif case == "corrupt":
        (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif case == "truncated":
        (root / "a" / "cut.png").write_bytes((root / "a" / "0.png").read_bytes()[:60])
    elif case == "sizes differ":
        _solid(root / "b" / "odd.png", size=(20, 10))
    with pytest.raises(DataError, match=pattern) as err:
        load_dataset(_cfg(root), seed=0, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("*/images.npy")) or case == "too few"


def test_exif_orientation_is_applied(tmp_path):
    upright = np.zeros((12, 20, 3), np.uint8)
    upright[:4, :10] = (250, 20, 20)  # a red block at the top left: rotations move it
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as a sideways camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "tagged.jpg", quality=100, exif=exif)
    stored.save(tmp_path / "plain.jpg", quality=100)
    plain, tagged = decode_image(tmp_path / "plain.jpg"), decode_image(tmp_path / "tagged.jpg")
    assert plain.shape == (20, 12, 3) and tagged.shape == (12, 20, 3)
    assert np.array_equal(tagged, np.rot90(plain, k=-1))  # the same pixels, turned upright
    assert np.abs(tagged.astype(int) - upright).mean() < 4  # ... which is the upright picture (JPEG aside)
    data = (tmp_path / "tagged.jpg").read_bytes()
    assert np.array_equal(decode_image(data, (6, 10)), decode_image(tmp_path / "tagged.jpg", (6, 10)))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    gray = decode_image(tmp_path / "deep.png", mode="L")
    assert gray.dtype == np.uint8 and gray.min() == 0 and gray.max() == 255
    assert np.abs(gray.astype(int) - np.rint(ramp / 257)).max() == 0
    assert (gray == 255).sum() == 1  # clipping would have made almost every pixel white
    rgb = decode_image(tmp_path / "deep.png", mode="RGB")
    assert rgb.shape == (16, 16, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    assert decode_image(_tiff(tmp_path / "unit.tif", unit), mode="L").max() == 255
    hdr = unit * 40 - 10  # outside [0, 1]: stretched over its own range
    out = decode_image(_tiff(tmp_path / "hdr.tif", hdr), mode="L")
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 50


def _tiff(path: Path, a: np.ndarray) -> Path:
    Image.fromarray(a, "F").save(path)
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` and whose pixel data is garbage."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def test_refused_formats_and_sizes_are_never_decoded(tmp_path):
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n")
    with pytest.raises(ImageError, match=r"drawing.eps: not a readable image \(not one of PNG, JPEG"):
        decode_image(eps)
    with pytest.raises(ImageTooLarge, match=r"upload: image .*larger than"):
        decode_image(_png_header(100_000, 100_000), name="upload")  # a gigapixel claim: refused at the header
    for action in ("ignore", "error"):  # above Pillow's warning limit: refused whether its warning is shown or raised
        with warnings.catch_warnings(), pytest.raises(ImageTooLarge, match=r"image: image .*larger than 67108864 pixels"):
            warnings.simplefilter(action)
            decode_image(_png_header(9000, 9000))
    with pytest.raises(ImageTooLarge, match=r"image: image of 30x20 pixels is larger than 500 pixels"):
        decode_image(_png_header(30, 20), max_pixels=500)  # garbage pixels: it would fail if decoded
    with pytest.raises(ImageError, match=r"image: not a readable image"):
        decode_image(_png_header(30, 20))  # ... as it does here
    ok = io.BytesIO()
    Image.new("RGB", (30, 20)).save(ok, "PNG")
    assert decode_image(ok.getvalue(), max_pixels=600).shape == (20, 30, 3)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for c in ("a", "b"):
        for i in range(4):
            _solid(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "a" / "sneaky.png").write_bytes(eps.read_bytes())
    with pytest.raises(DataError, match=r"a/sneaky.png: not a readable image \(not one of"):
        load_dataset(_cfg(tmp_path / "imgs"), seed=0, cache_dir=tmp_path / "cache")


def test_work_folders_go_with_their_run_and_their_process(tmp_path):
    """A run's work folders are removed when it ends, a process's when it exits, and those of processes
    killed before their exit hooks when the next one starts: the temp dir does not fill up."""
    import os
    import subprocess
    import sys

    from edgeopt.artifacts import new_workdir, remove_orphaned_workroots, workdir_scope

    with workdir_scope() as scope:
        made = new_workdir("data")
        (made / "x.npy").write_bytes(b"0" * 1000)
        assert made.parent == scope and made.name.startswith("data-")
    assert not scope.exists() and scope.parent.is_dir()

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = "from edgeopt.artifacts import new_workdir; d = new_workdir('m'); (d / 'f').write_text('x'); print(d)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)},
                         check=True)
    assert out.stdout.strip().startswith(str(tmp / "edgeopt-")) and not list(tmp.iterdir())

    dead, alive = tmp / "edgeopt-999999999-abc", tmp / f"edgeopt-{os.getpid()}-abc"
    for d in (dead, alive, tmp / "edgeopt-locks", tmp / "edgeopt-data-old"):
        d.mkdir()
    assert remove_orphaned_workroots(tmp) == [dead]
    assert sorted(p.name for p in tmp.iterdir()) == sorted([alive.name, "edgeopt-locks", "edgeopt-data-old"])
