"""The training sections of a run config: how a model is fit (``FitConfig``, with augmentation), and the
teacher and the student it fits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from edgeopt.config.base import Strict
from edgeopt.config.paths import resolve_path

# Names of edgeopt.models.zoo.ARCHITECTURES, listed here so that validating a config imports no torch.
ARCHITECTURE_NAMES = (
    "small_cnn", "resnet_small", "resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "squeezenet1_1", "efficientnet_b0",
)


class AugmentConfig(Strict):
    """What each training image goes through before normalization (torchvision transforms v2, drawn
    per image). A KD teacher sees the very same views as the student (function matching). Every
    option is off by default, so ``augment: {}`` trains on the images as they are."""

    random_resized_crop: Optional[float] = Field(
        None, gt=0, le=1, description="Crop a random region of at least this fraction of the area (aspect 3/4 to "
                                      "4/3) and resize it back (torchvision's ImageNet recipe: 0.08); null: off.",
    )
    hflip: bool = Field(False, description="Mirror half of the images left-right (off where a mirror changes the "
                                           "class: digits, text).")
    color_jitter: float = Field(0.0, ge=0, le=1, description="Brightness, contrast and saturation jitter; 0: off.")
    shift_px: float = Field(0.0, ge=0, le=8, description="Random sub-pixel translation of up to this many pixels "
                                                         "(border padding): what tiny images bear.")


class FitConfig(Strict):
    """How a model is trained (the teacher, the student and every KD fine-tune after a shrink): steps
    with a linear warm-up and a cosine decay, augmentation, evaluation on the val split with early
    stop, BatchNorm recalibration."""

    epochs: int = Field(10, ge=1, le=1000, description="Passes over the train split (when `steps` is not set).")
    steps: Optional[int] = Field(
        None, ge=1, le=10_000_000, description="Optimizer steps; default: epochs x batches per epoch.",
    )
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(0.01, gt=0, le=10, description="Peak learning rate, reached after the warm-up.")
    weight_decay: float = Field(5e-4, ge=0, le=1)
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd: momentum 0.9, Nesterov (training from scratch); adamw (fine-tuning pretrained weights).",
    )
    warmup: float = Field(
        0.1, ge=0, lt=1, description="Fraction of the steps over which the learning rate rises linearly to `lr`; "
                                     "a cosine decay to 0 follows.",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the hard-label cross-entropy.")
    augment: AugmentConfig | Literal["auto"] = Field(
        "auto", description="'auto': chosen from the data (crops of at least half the area and mirrors for RGB "
                            "images of 32 pixels a side or more, crops alone for grayscale ones, a 1-pixel shift for "
                            "digits and smaller images); or the options, e.g. {random_resized_crop: 0.35, hflip: true, "
                            "color_jitter: 0.2}; {} for none.",
    )
    eval_every: Optional[int] = Field(
        None, ge=1, description="Evaluate on the val split every this many steps; default: once per epoch.",
    )
    patience: Optional[int] = Field(
        None, ge=1, description="Stop after this many evaluations without a better val accuracy; null: run every "
                                "step. The weights best on val are kept either way.",
    )
    bn_recalibration_batches: int = Field(
        10, ge=0, le=100000, description="Before each evaluation, recompute BatchNorm statistics over this many "
                                         "un-augmented train batches (MobileNetV3 and EfficientNet need it); 0: off.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where training, KD and fine-tunes run: auto (CUDA when torch sees a GPU, else the CPU), "
                            "cpu, or cuda (refused where there is none). Models are saved and exported from the CPU.",
    )

    @field_validator("augment", mode="before")
    @classmethod
    def _auto_or_options(cls, v):
        if not isinstance(v, (dict, AugmentConfig)) and v != "auto":
            raise ValueError("expected 'auto' or a mapping of options (random_resized_crop, hflip, color_jitter, "
                             "shift_px)")
        return v


class TrainConfig(FitConfig):
    arch: str = Field(description="Architecture name from edgeopt.models.zoo.ARCHITECTURES.")
    width: int = Field(16, ge=1, le=512, description="Base channel width of the small architectures.")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v):
        if v not in ARCHITECTURE_NAMES:
            raise ValueError(f"unknown architecture {v!r}; expected one of {', '.join(ARCHITECTURE_NAMES)}")
        return v


class TeacherConfig(TrainConfig):
    """The model to compress: trained here from scratch (``arch``), or brought by the user as a state dict
    for ``arch`` (``checkpoint``) or as an ONNX file (``onnx``). It is the reference every variant is
    compared with, the KD teacher of the student, and a base for variants of its own."""

    arch: Optional[str] = Field(None, description="Architecture name (edgeopt.models.zoo.ARCHITECTURES); "  # type: ignore[assignment]
                                                  "not needed for an ONNX model.")
    checkpoint: Optional[Path] = Field(
        None, description="Load the teacher from this state dict (.pt/.pth, or .safetensors) for `arch` "
                          "instead of training it.",
    )
    onnx: Optional[Path] = Field(None, description="Use this ONNX model (any single-input image classifier, "
                                                   "fixed or dynamic batch) instead of training one.")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v):
        if v is not None and v not in ARCHITECTURE_NAMES:
            raise ValueError(f"unknown architecture {v!r}; expected one of {', '.join(ARCHITECTURE_NAMES)}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if self.checkpoint is not None and self.onnx is not None:
            raise ValueError("set at most one of teacher.checkpoint and teacher.onnx")
        if self.arch is None and self.onnx is None:
            raise ValueError("teacher.arch is required unless teacher.onnx brings the model")
        for field, suffixes in (("checkpoint", (".pt", ".pth", ".safetensors")), ("onnx", (".onnx",))):
            path = getattr(self, field)
            if path is None:
                continue
            if path.suffix not in suffixes:
                raise ValueError(f"teacher.{field}: expected a {'/'.join(suffixes)} file, got {path.name}")
            if not resolve_path(path).is_file():
                raise ValueError(f"teacher.{field}: file not found: {path}")
        return self

    @property
    def source(self) -> Optional[Path]:
        return self.checkpoint or self.onnx


class KDConfig(Strict):
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T (Hinton: 4).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KD term; 1-alpha weighs the hard-label CE.")


class StudentConfig(TrainConfig):
    kd: KDConfig = KDConfig()
    checkpoint: Optional[Path] = Field(
        None, description="Start from this state dict (.pt/.pth or .safetensors; e.g. ImageNet weights for `arch`): "
                          "every tensor whose name and shape match is loaded, the rest (a classifier for another "
                          "number of classes) keeps its fresh initialization.",
    )

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_file(cls, v):
        if v is not None and v.suffix not in (".pt", ".pth", ".safetensors"):
            raise ValueError(f"expected a .pt/.pth/.safetensors file, got {v.name}")
        if v is not None and not resolve_path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v
