"""The brought model against the user's own data, before any step starts: how its input is normalized,
which class each output index is, and whether it scores above chance at all.

A brought model is only as good as the agreement between the pixels it was trained on and the pixels
it is fed; a mismatch (ImageNet statistics against the train split's, a class order other than the
sorted folder names, a stretch where it was trained on centre crops) shows as nothing but a low
accuracy. So, on up to :data:`PROBE_IMAGES` validation images, decoded the way the run decodes them:

- the normalization comes from the model's metadata when the ONNX file carries it
  (``metadata_props``: ``mean``/``std``, or Windows ML's ``Image.NominalPixelRange``), else from the
  config; ``data.mean: auto`` tries the candidates (the metadata's, ImageNet's, [0, 1], [-1, 1], the
  train split's statistics) and keeps the one the model scores best with, saying so;
- the class order comes from ``data.labels``, else from the metadata's class names when they are the
  folder names (``labels``, ``classes``, ``class_names`` or ``names``);
- a class order that scores :data:`WARN_GAIN` better than the configured one (the best assignment of output
  indices to folders on the confusion matrix) is named in a warning: it is not applied on its own;
- a model that scores near chance (``edgeopt.train.fit.chance_level``) is refused with the reason and
  what scored better, unless ``checks.near_chance: warn`` (``--force``).

No ZenML here; ``edgeopt run`` and ``edgeopt optimize`` call :func:`prepare_reference`.
"""

from __future__ import annotations

import ast
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from edgeopt.config import DataConfig, RunConfig, resolve_path
from edgeopt.config.data import NORMALIZATIONS, normalization
from edgeopt.data.labels import parse_labels

log = logging.getLogger(__name__)

PROBE_IMAGES = 256  # validation images the brought model is scored on before the run
WARN_GAIN = 0.10  # another normalization scoring this much better than the configured one is worth a warning
LABEL_KEYS = ("labels", "classes", "class_names", "names")
PIXEL_RANGES = {"normalized_0_1": "zero-one", "normalized_1_1": "minus-one-one"}  # Image.NominalPixelRange

Stats = Tuple[List[float], List[float]]


class ReferenceError(ValueError):
    """The brought model does not fit the data (near chance), as one line with the reason."""


@dataclass
class Prepared:
    """The config as the run will use it (normalization and class order decided) and what was decided."""

    config: RunConfig
    notes: List[str] = field(default_factory=list)  # what was decided and why: for the log and the report
    warnings: List[str] = field(default_factory=list)
    accuracy: Optional[float] = None  # the brought model's accuracy on the probe, as the run will feed it
    scores: Dict[str, float] = field(default_factory=dict)  # normalization tried -> accuracy on the probe
    normalization: str = "train"  # which one the run uses: train, a name, metadata or configured


def model_metadata(path) -> Dict[str, Any]:
    """What an ONNX file's ``metadata_props`` say about its input and classes: ``stats`` (mean, std of pixels
    in [0, 1]; values over 1.5 are read as 0-255 units), ``pixel_range`` (a normalization's name) and
    ``labels`` (class names by index). Keys are matched without regard to case; what cannot be read is left out."""
    import onnx

    props = {p.key.strip().lower(): p.value for p in onnx.load(str(resolve_path(path)), load_external_data=False).metadata_props}
    out: Dict[str, Any] = {}
    mean, std = _numbers(props.get("mean")), _numbers(props.get("std"))
    if mean and std and len(mean) == len(std) and min(std) > 0:
        div = 255.0 if max(mean + std) > 1.5 else 1.0
        out["stats"] = ([m / div for m in mean], [s / div for s in std])
    pixel_range = props.get("image.nominalpixelrange", "").strip().lower()
    if pixel_range in PIXEL_RANGES:
        out["pixel_range"] = PIXEL_RANGES[pixel_range]
    for key in LABEL_KEYS:
        if key in props and (labels := _labels(props[key])):
            out["labels"] = labels
            break
    return out


def _numbers(text: Optional[str]) -> Optional[List[float]]:
    if not text:
        return None
    try:
        value = json.loads(text)
        return [float(v) for v in value] if isinstance(value, list) else None
    except (ValueError, TypeError):
        try:
            return [float(v) for v in text.replace(",", " ").split()]
        except ValueError:
            return None


def _labels(text: str) -> Optional[List[str]]:
    for read in (json.loads, ast.literal_eval):  # JSON, or a Python literal such as Ultralytics' {0: 'person', ...}
        try:
            return parse_labels(read(text))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    names = [n.strip() for n in text.splitlines() if n.strip()]
    return names if len(names) > 1 else None


def _candidates(data: DataConfig, meta: Dict[str, Any], channels: int, train: Stats) -> Dict[str, Stats]:
    """The normalizations worth trying, in order of preference on a tie: the metadata's, then the names."""
    out: Dict[str, Stats] = {}
    if "stats" in meta and len(meta["stats"][0]) == channels:
        out["metadata"] = meta["stats"]
    elif "pixel_range" in meta:
        out["metadata"] = normalization(meta["pixel_range"], channels)
    for name in NORMALIZATIONS:
        out[name] = normalization(name, channels)
    out["train"] = train
    return out


def _label_order(data: DataConfig, meta: Dict[str, Any], notes: List[str]) -> DataConfig:
    """``data`` with the metadata's class names as its label map when it has none and they are the folders."""
    names = meta.get("labels")
    if data.labels is not None or not names or data.source != "imagefolder" or data.root is None:
        return data
    from edgeopt.data.sources import class_folders

    folders = class_folders(resolve_path(data.root))
    if set(names) == set(folders):
        notes.append(f"class order: the model's own class names (ONNX metadata), {', '.join(names[:6])}"
                     + (" ..." if len(names) > 6 else ""))
        return data.model_copy(update={"labels": list(names)})
    notes.append(f"the model's metadata names {len(names)} classes ({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}) "
                 f"that are not the {len(folders)} class folders: class i is the i-th folder name, sorted "
                 "(set data.labels to map them)")
    return data


def _predict(cfg: RunConfig, classes: int, channels: int) -> Callable[[np.ndarray], np.ndarray]:
    """The brought model as a function of a normalized float32 batch."""
    teacher = cfg.teacher
    if teacher.onnx is not None:
        from edgeopt.runtimes.onnxruntime import OrtPredictor

        ort_model = OrtPredictor(resolve_path(teacher.onnx), 0)
        return ort_model.predict_batched
    import torch

    from edgeopt.models.brought import load_state_dict_teacher

    assert teacher.checkpoint is not None and teacher.arch is not None
    torch_model = load_state_dict_teacher(teacher.checkpoint, {"name": teacher.arch, "num_classes": classes,
                                                               "in_channels": channels, "width": teacher.width}, None)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch_model(torch.from_numpy(x)).numpy()

    return run


def _describe(name: str, stats: Stats) -> str:
    what = {"metadata": "the model's metadata", "train": "the train split's statistics",
            "configured": "the configured"}.get(name, name)
    return f"{what} (mean {[round(v, 3) for v in stats[0]]}, std {[round(v, 3) for v in stats[1]]})"


def best_class_order(predicted: np.ndarray, labels: np.ndarray, classes: List[str]) -> Tuple[List[str], float]:
    """The folder name for each output index that agrees best with the labels (an assignment on the
    confusion matrix, so each folder is named once), and the accuracy in that order."""
    from scipy.optimize import linear_sum_assignment

    k = len(classes)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (predicted, labels), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return [classes[c] for c in cols[np.argsort(rows)]], float(confusion[rows, cols].sum() / max(len(labels), 1))


def prepare_reference(cfg: RunConfig) -> Prepared:
    """Decide the brought model's normalization and class order on validation images and refuse a model that
    scores near chance (see the module's doc); a trained teacher needs none of it. Loads the data (its decoded
    images are cached for the run's own ``load_data``)."""
    source = cfg.teacher.onnx or cfg.teacher.checkpoint
    data, notes, warnings = cfg.data, [], []
    if source is None:
        if data.mean == "auto":
            notes.append("normalization: the train split's statistics (data.mean: auto; the teacher is trained here)")
            data = data.model_copy(update={"mean": None, "std": None})
        return Prepared(cfg.model_copy(update={"data": data}), notes)
    from edgeopt.data.sources import load_dataset
    from edgeopt.train.fit import chance_level

    meta = model_metadata(source) if cfg.teacher.onnx is not None else {}
    data = _label_order(data, meta, notes)
    ds = load_dataset(data.model_copy(update={"mean": None, "std": None}), cfg.seed)
    x, y = next(ds.batches("val", PROBE_IMAGES, normalized=False, limit=PROBE_IMAGES))
    pixels = x.astype(np.float32) / np.float32(ds.scale)
    channels = ds.input_shape[0]
    candidates = _candidates(data, meta, channels, (ds.mean.tolist(), ds.std.tolist()))
    configured: Optional[str] = None
    if isinstance(data.mean, list) and isinstance(data.std, list):
        configured = next((n for n, s in candidates.items() if n not in ("metadata", "train") and s == (data.mean, data.std)),
                          "configured")
        candidates = {configured: (list(data.mean), list(data.std)), **candidates}
    elif data.mean is None:
        configured = "metadata" if "metadata" in candidates else "train"
    predicted: Dict[str, np.ndarray] = {}

    def score(name: str, stats: Stats) -> float:
        m, s = (np.asarray(v, np.float32)[:, None, None] for v in stats)
        out = predict(((pixels - m) / s).astype(np.float32))
        if out.shape != (len(y), len(ds.classes)):
            raise ValueError(f"output shape {list(out.shape)[1:]} does not fit {len(ds.classes)} classes")
        predicted[name] = out.argmax(1)
        return float((predicted[name] == y).mean())

    try:
        predict = _predict(cfg, len(ds.classes), channels)
        scores = {name: score(name, stats) for name, stats in candidates.items()}
    except Exception as err:  # noqa: BLE001 - the run's own step reports what is wrong with the model, in its words
        from edgeopt.models.brought import first_line

        fallback = configured if configured in candidates else "metadata" if "metadata" in candidates else "train"
        warnings.append(f"the brought model could not be scored on validation images before the run ({first_line(err)}): "
                        f"its normalization ({_describe(fallback, candidates[fallback])}) and its score are not checked")
        stats = None if fallback == "train" else candidates[fallback]
        data = data.model_copy(update={"mean": stats[0] if stats else None, "std": stats[1] if stats else None})
        return Prepared(cfg.model_copy(update={"data": data}), notes, warnings, normalization=fallback)
    best = max(scores, key=lambda n: scores[n])  # the first of equals: the configured, the metadata's, then the names
    chosen = best if configured is None else configured
    tried = ", ".join(f"{n} {100 * a:.1f} %" for n, a in scores.items())
    how = "chosen as the best of the candidates on" if configured is None else "scored on"
    notes.append(f"normalization: {_describe(chosen, candidates[chosen])}, {how} {len(y)} validation images "
                 f"(accuracy of the brought model: {tried})")
    if configured is not None and scores[best] - scores[chosen] >= WARN_GAIN:
        warnings.append(f"the brought model scores {100 * scores[chosen]:.1f} % with {_describe(chosen, candidates[chosen])} "
                        f"but {100 * scores[best]:.1f} % with {_describe(best, candidates[best])}: "
                        + ("set data.mean: " + best if best in NORMALIZATIONS else "set data.mean/std to it")
                        + " (or data.mean: auto)")
    order, reordered = best_class_order(predicted[chosen], y, ds.classes)
    hint = ""
    if order != ds.classes and reordered - scores[chosen] >= WARN_GAIN:
        hint = (f"; in the class order data.labels: [{', '.join(order)}] (output index -> folder name) "
                f"it scores {100 * reordered:.1f} %")
        warnings.append(f"the brought model scores {100 * scores[chosen]:.1f} % with class i as the i-th of "
                        f"[{', '.join(ds.classes)}]" + hint + ": set data.labels to the order it was trained in")
    chance, learned = chance_level(y)
    accuracy = scores[chosen]
    if accuracy <= learned:
        reason = (f"the brought model {source.name} scores {100 * accuracy:.1f} % on {len(y)} validation images with "
                  f"{_describe(chosen, candidates[chosen])}, near chance ({100 * chance:.1f} %; a model that fits "
                  f"this data scores above {100 * learned:.1f} %): its normalization, class order (data.labels: class "
                  f"index -> folder name) or resize (data.resize) does not match how it was trained"
                  + (f"; with {_describe(best, candidates[best])} it scores {100 * scores[best]:.1f} %"
                     if scores[best] > learned else "") + hint)
        if cfg.checks.near_chance == "refuse":
            raise ReferenceError(reason + "; go on anyway with --force (checks.near_chance: warn)")
        warnings.append(reason + "; going on (checks.near_chance: warn)")
    stats = None if chosen == "train" else candidates[chosen]
    data = data.model_copy(update={"mean": stats[0] if stats else None, "std": stats[1] if stats else None})
    for w in warnings:
        log.warning("%s", w)
    return Prepared(cfg.model_copy(update={"data": data}), notes, warnings, accuracy, scores,
                    "configured" if configured == "configured" else chosen)
