"""The bundle in service: opened, verified (sha256 of every file) and warmed up once, then shared
by the requests; and the store that serves ``<root>/current``.

Every request reads the link (one ``readlink``); when it points at another bundle, that bundle is
loaded and verified in a background thread while the old one goes on serving, and the reference is
swapped under a lock once the new one is ready. A bundle that fails to load is reported in
/health, tried again with a growing wait, and the old one stays in service.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional, Tuple

import numpy as np
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, TypeAdapter, ValidationError, model_validator

from edgeopt.config.data import ResizeConfig
from edgeopt.deploy.bundle import Bundle
from edgeopt.runtimes import Predictor, make_predictor
from edgeopt.serve import ServeError

log = logging.getLogger(__name__)

RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # a bundle that failed to load is tried again, backing off


class Preprocessing(BaseModel):
    """A bundle's input: the shape the model takes, the per-channel mean and std of pixels in [0, 1], and how
    an image is resized to that shape (``data.resize`` of the run: stretch, or a centre crop; a bundle
    written before it was recorded stretches, as every run did then)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    input_shape: Tuple[PositiveInt, PositiveInt, PositiveInt]
    mean: List[float]
    std: List[Annotated[float, Field(gt=0)]]
    resize: ResizeConfig = ResizeConfig()

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


def first_error(err: ValidationError) -> str:
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
            raise ServeError(f"{path}: {what}: {first_error(err)}") from None

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
            raise ServeError(f"{self.root}: no 'current' bundle (nothing deployed yet: run `edgeopt run`)")
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

