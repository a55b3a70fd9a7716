"""The one image decoder: an image file (or uploaded bytes) -> a uint8 array, for training and serving.

A model is only as good as the agreement between the pixels it was trained on and the pixels it is
served, so the rules live here once and both sides call :func:`decode_image`:

- only the formats listed in :data:`FORMATS` are opened (Pillow is told to try no other plugin:
  EPS/PS would run Ghostscript, ICO decodes its embedded PNG while opening, and the rarer plugins
  are attack surface nobody here needs); a file of another format is refused by that format's name,
  found from its first bytes by the plugins' own signature checks, which decode nothing;
- the pixel count is checked from the header, before any pixel is decoded (a few kilobytes of
  PNG can declare a gigapixel image);
- the EXIF orientation is applied, so a phone photo is upright whichever way it was stored;
- 16-bit and float images are scaled to 0..255, not clipped (a clip turns most 16-bit images white);
- then the image is converted to ``"RGB"`` or ``"L"`` and resized with Pillow's bilinear filter,
  which antialiases when it shrinks: stretched to the size, or (``crop``) resized with its aspect kept
  so that the size is that fraction of it on the tighter side, and its centre cut out.

No torch here: the server imports this module.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_PIXELS = 8192 * 8192
# Pillow's own guard (a warning above the limit, an error above twice it) agrees with ours instead of
# its default of about 89 megapixels; decode_image refuses anything above ``max_pixels`` itself.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Part of every decode-cache key: change it when a rule above changes what an image decodes to.
VERSION = 1

_WIDE_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageError(ValueError):
    """An image that cannot be used, as one line that names it (the file, or the name the caller gave)."""


class ImageTooLarge(ImageError):
    """The header declares more pixels than allowed; nothing was decoded."""


class ImageFormatRefused(ImageError):
    """An image format outside :data:`FORMATS` (named in the message); nothing was decoded."""


def image_pixels(source: Union[Path, bytes], *, max_pixels: int = MAX_PIXELS, name: Optional[str] = None) -> int:
    """Width x height from the header alone, with :func:`decode_image`'s checks and errors; decodes nothing."""
    with _opened(source, max_pixels, _label(source, name)) as im:
        return im.width * im.height


def resize(im: Image.Image, size: Optional[Tuple[int, int]], crop: Optional[float] = None) -> Image.Image:
    """``im`` at ``size`` (height, width), bilinear; unchanged when ``size`` is None or already its size.

    ``crop`` (a fraction in (0, 1]): resize keeping the aspect so that ``size`` is ``crop`` of the image on its
    tighter side, then cut out the centre ``size`` (torchvision's Resize(256) + CenterCrop(224) is 0.875).
    Training's loader, the digits and the server all resize through here."""
    if size is None:
        return im
    h, w = size
    if crop is None:
        return im if im.size == (w, h) else im.resize((w, h), Image.Resampling.BILINEAR)
    scale = max(h / im.height, w / im.width) / crop
    big_w, big_h = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    left, top = (big_w - w) // 2, (big_h - h) // 2
    if (big_w, big_h) != im.size:
        im = im.resize((big_w, big_h), Image.Resampling.BILINEAR)
    return im.crop((left, top, left + w, top + h))


def decode_image(
    source: Union[Path, bytes],
    size: Optional[Tuple[int, int]] = None,
    mode: str = "RGB",
    *,
    max_pixels: int = MAX_PIXELS,
    name: Optional[str] = None,
    crop: Optional[float] = None,
) -> np.ndarray:
    """Decode ``source`` to uint8 ``H x W x 3`` (``mode="RGB"``) or ``H x W`` (``"L"``).

    ``size`` is ``(height, width)``; ``None`` keeps the image's own size (after EXIF rotation); ``crop``: a
    centre crop of that fraction instead of a stretch (:func:`resize`).
    ``max_pixels`` may be lowered (the server does) but not raised above :data:`MAX_PIXELS`, which
    Pillow enforces too. Raises :class:`ImageError` (:class:`ImageTooLarge` for the pixel limit)
    whose message starts with ``name`` (default: the path, or ``"image"`` for bytes).
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    label = _label(source, name)
    with _opened(source, max_pixels, label) as im:
        try:
            upright = ImageOps.exif_transpose(im)
            return np.array(resize(_to_8bit(upright).convert(mode), size, crop), dtype=np.uint8)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # a frame beyond the header's size
            raise ImageTooLarge(f"{label}: image larger than {max_pixels} pixels") from None
        except Exception as err:  # noqa: BLE001 - decoding untrusted bytes: any failure means "not an image"
            raise ImageError(f"{label}: not a readable image ({_reason(err)})") from None


def _label(source: Union[Path, bytes], name: Optional[str]) -> str:
    return name or (str(source) if isinstance(source, Path) else "image")


def _reason(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}{': ' if text else ''}{text}"


@contextmanager
def _opened(source: Union[Path, bytes], max_pixels: int, label: str) -> Iterator[Image.Image]:
    """The image opened by an allowed plugin, its header read and its size checked; no pixel decoded yet."""
    try:
        empty = (source.stat().st_size if isinstance(source, Path) else len(source)) == 0
    except OSError as err:
        raise ImageError(f"{label}: cannot read ({err.strerror or err})") from None
    if empty:
        raise ImageError(f"{label}: empty file (0 bytes)")
    try:
        im = Image.open(source if isinstance(source, Path) else io.BytesIO(source), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning: where warnings are errors
        raise ImageTooLarge(f"{label}: image larger than {max_pixels} pixels") from None
    except UnidentifiedImageError:
        fmt = _format_of(source)
        allowed = ", ".join(FORMATS)
        if fmt in FORMATS:
            raise ImageError(f"{label}: not a readable image (a broken {fmt} file)") from None
        if fmt is not None:
            raise ImageFormatRefused(f"{label}: not a readable image (not one of {allowed}: "
                                     f"{fmt} files are refused)") from None
        raise ImageError(f"{label}: not a readable image (not one of {allowed})") from None
    except Exception as err:  # noqa: BLE001 - a header that breaks a plugin: not an image
        raise ImageError(f"{label}: not a readable image ({_reason(err)})") from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{label}: image of {width}x{height} pixels is larger than {max_pixels} pixels")
        yield im


def _format_of(source: Union[Path, bytes]) -> Optional[str]:
    """The name of the Pillow format whose signature ``source`` starts with (its plugin's ``_accept``, a
    comparison of the first 16 bytes, as :func:`PIL.Image.open` does before choosing a plugin), or None."""
    try:
        with source.open("rb") if isinstance(source, Path) else io.BytesIO(source) as f:
            prefix = f.read(16)
    except OSError:
        return None
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            known = accept is not None and accept(prefix)
        except Exception:  # noqa: BLE001 - a signature check that cannot read a short prefix: not this format
            continue
        if known and not isinstance(known, str):  # a str is a plugin's "maybe" warning, not a match
            return fmt
    return None


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float image to 8 bits; other modes pass through.

    Integers that fit 16 bits (16-bit PNG and TIFF, which Pillow may open as ``"I"``) are scaled by
    the full 16-bit range, so the same file always maps the same way; float images whose values lie
    in [0, 1] are scaled by 255. Anything else (a 32-bit range, HDR floats) is stretched from its own
    minimum to its maximum, the only mapping that neither clips nor guesses a range.
    """
    if im.mode not in _WIDE_INT_MODES and im.mode != "F":
        return im
    a = np.asarray(im, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode != "F" and lo >= 0 and hi <= 65535:
        a = a / 257.0  # 65535 / 255: the 16-bit range onto the 8-bit one
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.rint(a).astype(np.uint8), "L")
