"""The ``data`` section of a run config: where the images are, how they are split, sized and normalized,
and which class index each folder is."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import Field, field_validator, model_validator

from edgeopt.config.base import Strict
from edgeopt.config.paths import resolve_path

# Bounds of what a config may ask for: images larger than this on a side are not what an edge model
# eats, and one such image alone is gigabytes as float32.
MAX_IMAGE_SIDE = 2048
MAX_CLASSES = 100_000

# Named normalizations of pixels scaled to [0, 1], per channel (RGB; a grayscale image takes the mean of the
# three). ``train``: the train split's own statistics (the default); ``auto``: the brought model's metadata,
# else the candidate that scores best on validation images (edgeopt.plan.reference decides before the run).
NORMALIZATIONS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "zero-one": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "minus-one-one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
PRESETS = ("train", "auto", *NORMALIZATIONS)


def normalization(name: str, channels: int) -> Tuple[List[float], List[float]]:
    """(mean, std) of a named normalization for ``channels`` (1 or 3) channels."""
    mean, std = NORMALIZATIONS[name]
    if channels == 1:
        return [round(sum(mean) / 3, 4)], [round(sum(std) / 3, 4)]
    return list(mean), list(std)


class SplitConfig(Strict):
    val: float = Field(0.15, gt=0, lt=0.5, description="Fraction of the data held out for validation.")
    test: float = Field(0.25, gt=0, lt=0.5, description="Fraction of the data held out for the final test.")


class ResizeConfig(Strict):
    """How an image becomes ``image_size``: ``stretch`` (the default) resizes it to that size whatever its
    aspect; ``center_crop`` resizes it, keeping its aspect, so that ``image_size`` is ``crop_fraction`` of it
    on the tighter side, and cuts the centre out (torchvision's ImageNet evaluation: 256 then 224, 0.875).
    Training, evaluation and serving decode through the same function (edgeopt.data.images)."""

    mode: Literal["stretch", "center_crop"] = "stretch"
    crop_fraction: float = Field(0.875, gt=0, le=1, description="center_crop: image_size over the resized side.")

    @property
    def crop(self) -> Optional[float]:
        """The centre-crop fraction that :func:`edgeopt.data.images.decode_image` takes; None: stretch."""
        return self.crop_fraction if self.mode == "center_crop" else None


class DataConfig(Strict):
    source: Literal["digits", "imagefolder"] = Field(
        "digits", description="'digits': scikit-learn's bundled 8x8 digits; 'imagefolder': root/<class>/*.png."
    )
    root: Optional[Path] = Field(None, description="ImageFolder root (required when source is 'imagefolder'); "
                                                   "relative to the config file's folder.")
    image_size: Optional[Tuple[int, int]] = Field(
        None, description="[height, width] to resize to; default: the data's own size (8x8 for digits).",
    )
    resize: ResizeConfig = Field(ResizeConfig(), description="stretch (default) or center_crop (with crop_fraction); "
                                                             "'center_crop' alone is short for {mode: center_crop}.")
    grayscale: bool = Field(False, description="Convert ImageFolder images to one channel.")
    mean: Union[List[float], Literal["auto"], None] = Field(
        None, description="Per-channel normalization mean of pixels scaled to [0, 1], or a name: train (the train "
                          "split's statistics: the default), imagenet, zero-one (pixels in [0, 1] as they are), "
                          "minus-one-one ([-1, 1]), auto (a brought model's metadata, else the one it scores best "
                          "with on validation images, decided and reported before the run).",
    )
    std: Union[List[float], Literal["auto"], None] = Field(
        None, description="Per-channel normalization std, or the same name as mean (a name in mean sets both).",
    )
    labels: Union[Path, List[str], None] = Field(
        None, description="Class index -> folder name: a file (labels.txt, one folder name per line, line i is class "
                          "i; or labels.json, a list or {\"0\": name, ...}) or the list itself; default: the folder "
                          "names sorted. A brought model's class order must match it.",
    )
    split: SplitConfig = SplitConfig()

    @model_validator(mode="before")
    @classmethod
    def _named_normalization(cls, data: Any) -> Any:
        """A name in mean or std becomes the pair of lists it stands for (``train`` becomes null)."""
        if not isinstance(data, dict):
            return data
        mean, std = data.get("mean"), data.get("std")
        named = [v for v in (mean, std) if isinstance(v, str)]
        if not named:
            return data
        if len(set(named)) > 1 or (len(named) == 1 and mean is not None and std is not None):
            raise ValueError(f"data.mean and data.std: a name ({', '.join(PRESETS)}) goes in mean alone, or the same "
                             f"in both; got mean {mean!r}, std {std!r}")
        name = named[0]
        if name not in PRESETS:
            raise ValueError(f"data.mean: unknown normalization {name!r}; expected a list of numbers or one of "
                             f"{', '.join(PRESETS)}")
        if name in ("train", "auto"):
            return {**data, "mean": None if name == "train" else "auto", "std": None if name == "train" else "auto"}
        channels = 1 if data.get("source", "digits") == "digits" or data.get("grayscale") else 3
        m, s = normalization(name, channels)
        return {**data, "mean": m, "std": s}

    @field_validator("resize", mode="before")
    @classmethod
    def _resize_mode(cls, v):
        return {"mode": v} if isinstance(v, str) else v

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, v):
        if v is not None and min(v) < 4:
            raise ValueError("each side must be at least 4 pixels")
        if v is not None and max(v) > MAX_IMAGE_SIDE:
            raise ValueError(f"each side must be at most {MAX_IMAGE_SIDE} pixels")
        return v

    @field_validator("labels")
    @classmethod
    def _label_map(cls, v):
        if isinstance(v, list):
            if len(v) > MAX_CLASSES or len(set(v)) != len(v) or not all(v):
                raise ValueError(f"a list of distinct, non-empty folder names (at most {MAX_CLASSES})")
        elif v is not None:
            if v.suffix.lower() not in (".txt", ".json"):
                raise ValueError(f"expected a .txt or .json file, got {v.name}")
            if not resolve_path(v).is_file():
                raise ValueError(f"file not found: {v}{_looked_in(v)}")
        return v

    @model_validator(mode="after")
    def _mean_std_together(self):
        if (self.mean is None) != (self.std is None) or (self.mean == "auto") != (self.std == "auto"):
            raise ValueError("data.mean and data.std go together: set both or neither")
        if isinstance(self.std, list) and (len(self.std) != len(self.mean or []) or min(self.std) <= 0):
            raise ValueError("data.std: one positive value per channel, as many as data.mean")
        return self

    @model_validator(mode="after")
    def _root_for_imagefolder(self):
        if self.source == "imagefolder":
            if self.root is None:
                raise ValueError("data.root is required when data.source is 'imagefolder'")
            root = resolve_path(self.root)
            if not root.is_dir():
                what = "not a folder" if root.exists() else "folder not found"
                raise ValueError(f"data.root: {what}: {self.root}{_looked_in(self.root)}")
        if self.resize.mode == "center_crop" and self.image_size is None:
            raise ValueError("data.resize: center_crop needs data.image_size (the size of the centre cut out)")
        return self

    def statistics(self) -> Optional[Tuple[List[float], List[float]]]:
        """The configured (mean, std); None for the train split's. ``auto`` must have been decided before."""
        if self.mean == "auto" or self.std == "auto":
            raise ValueError("data.mean: auto is decided before the run (edgeopt run / optimize, or "
                             "edgeopt.plan.reference.prepare_reference); set mean and std here to load data directly")
        if self.mean is None or self.std is None:
            return None
        return list(self.mean), list(self.std)


def _looked_in(p: Path) -> str:
    """Where a relative path was looked for, when that is not plain from the path as written."""
    p = Path(p)
    return "" if p.is_absolute() or str(p).startswith("~") else f" (looked in {resolve_path(p).parent})"
