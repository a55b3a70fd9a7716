"""Request bodies to a normalized float32 batch [N,C,H,W]: ``{"inputs": [...]}`` as JSON, or image
files. Bad input is an HTTPException with a 4xx and one line; image headers are read before any
pixel is decoded, against a per-image and a per-request pixel limit."""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Tuple

import numpy as np
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgeopt.data.images import ImageError, ImageFormatRefused, ImageTooLarge, decode_image, image_pixels
from edgeopt.serve.store import Preprocessing, first_error

MAX_IMAGE_PIXELS = 4096 * 4096  # checked before decoding: a small file can hold a huge image
DEFAULT_MAX_REQUEST_PIXELS = 2 * MAX_IMAGE_PIXELS  # all the images of one request together

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
        raise HTTPException(400 if invalid_json else 422, f"body: {first_error(err)}") from None
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
    # the decoder training used: same formats, EXIF rotation, bit-depth scaling, conversion and resize (a
    # stretch, or the centre crop the model was evaluated with)
    x = _image_call(decode_image, data, (h, w), mode, max_pixels=MAX_IMAGE_PIXELS, name=name, crop=pre.resize.crop)
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

