"""The run configuration's schema: plain data (pydantic), with the checks a field can make alone.

Checks against the registries (is this precision, format, runtime or technique known; does the plan
have a variant of every base) are ``edgeopt.plan.check``'s: it validates this schema with itself as the
validation context, so this module imports no registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from edgeopt.config.base import Strict
from edgeopt.config.paths import resolve_path, state_dir
from edgeopt.config.quant import QuantConfig
from edgeopt.config.training import StudentConfig, TeacherConfig

# Bounds of what a config may ask for: images larger than this on a side are not what an edge model
# eats, and one such image alone is gigabytes as float32.
MAX_IMAGE_SIDE = 2048
MAX_LIST_ITEMS = 32


def _registries(info: ValidationInfo) -> Any:
    """The registry checks of ``edgeopt.plan.check`` when it validates; None for the schema alone."""
    return (info.context or {}).get("registries")


def _known_precision(name: str, info: ValidationInfo) -> str:
    if (registries := _registries(info)) is not None:
        registries.precision(name)  # raises ValueError naming the known ones
    return name


# A precision: fp32 or a recipe registered in edgeopt.precisions (fp16, int8, int8-dynamic, int8-acc, ...);
# which formats each applies to: edgeopt.precisions.formats_for.
Scheme = Annotated[str, AfterValidator(_known_precision)]


class SplitConfig(Strict):
    val: float = Field(0.15, gt=0, lt=0.5, description="Fraction of the data held out for validation.")
    test: float = Field(0.25, gt=0, lt=0.5, description="Fraction of the data held out for the final test.")


class DataConfig(Strict):
    source: Literal["digits", "imagefolder"] = Field(
        "digits", description="'digits': scikit-learn's bundled 8x8 digits; 'imagefolder': root/<class>/*.png."
    )
    root: Optional[Path] = Field(None, description="ImageFolder root (required when source is 'imagefolder').")
    image_size: Optional[Tuple[int, int]] = Field(
        None, description="[height, width] to resize to; default: the data's own size (8x8 for digits)."
    )
    grayscale: bool = Field(False, description="Convert ImageFolder images to one channel.")
    mean: Optional[List[float]] = Field(
        None, description="Per-channel normalization mean (of pixels scaled to [0, 1]); default: the train split's. "
                          "A pretrained torchvision teacher wants ImageNet's [0.485, 0.456, 0.406].",
    )
    std: Optional[List[float]] = Field(
        None, description="Per-channel normalization std; default: the train split's (ImageNet: [0.229, 0.224, 0.225]).",
    )
    split: SplitConfig = SplitConfig()

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, v):
        if v is not None and min(v) < 4:
            raise ValueError("each side must be at least 4 pixels")
        if v is not None and max(v) > MAX_IMAGE_SIDE:
            raise ValueError(f"each side must be at most {MAX_IMAGE_SIDE} pixels")
        return v

    @model_validator(mode="after")
    def _mean_std_together(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std go together: set both or neither")
        if self.std is not None and (len(self.std) != len(self.mean or []) or min(self.std) <= 0):
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
                raise ValueError(f"data.root: {what}: {self.root}")
        return self


BASES = ("teacher", "student")


class VariantsConfig(Strict):
    bases: List[Literal["teacher", "student"]] = Field(
        ["teacher", "student"], min_length=1,
        description="Models that variants are made of: 'teacher' (the trained or brought model) and 'student' "
                    "(the distilled one). The teacher's FP32 ONNX is always measured: it is the reference.",
    )
    shrink: Dict[str, Any] = Field(
        {}, description="Structural techniques for every base, by name (prune, lowrank, sparsity, or any "
                        "registered in edgeopt.shrink.base): {amounts: [...], finetune_epochs or finetune_steps, "
                        "lr, and the technique's own options}. Each amount is a variant, KD fine-tuned from the "
                        "teacher; a brought ONNX teacher is converted to torch first (onnx2torch) and the "
                        "conversion checked against the file's own outputs.",
    )
    quantization: List[Scheme] = Field(
        ["fp32", "int8"], min_length=1,
        description="fp32, fp16, int8 (static PTQ: ORT QDQ / NNCF), int8-dynamic (ORT, ONNX only), "
                    "int8-acc (NNCF accuracy-controlled PTQ)",
    )
    formats: List[str] = Field(["onnx", "openvino"], min_length=1, description="Export formats (edgeopt.formats).")
    runtimes: List[str] = Field(
        ["onnxruntime", "openvino"], min_length=1,
        description="Runtimes to evaluate on (edgeopt.runtimes); each format runs on the runtimes that can read it.",
    )
    quant: QuantConfig = QuantConfig()

    @field_validator("bases", "quantization", "formats", "runtimes", mode="before")
    @classmethod
    def _short(cls, v):
        if isinstance(v, (list, tuple)) and len(v) > MAX_LIST_ITEMS:  # before validating each item of a huge list
            raise ValueError(f"at most {MAX_LIST_ITEMS} entries, got {len(v)}")
        return v

    @field_validator("bases", "quantization", "formats", "runtimes")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v, info: ValidationInfo):
        if (registries := _registries(info)) is not None:
            registries.formats(v)
        return v

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, v, info: ValidationInfo):
        if (registries := _registries(info)) is not None:
            registries.runtimes(v)
        return v

    @field_validator("shrink", mode="before")
    @classmethod
    def _technique_options(cls, v, info: ValidationInfo):
        if not isinstance(v, dict):
            raise ValueError("expected a mapping {technique: options}")
        registries = _registries(info)
        return v if registries is None else registries.techniques(v)


class ConstraintsConfig(Strict):
    max_latency_ms: Optional[float] = Field(None, gt=0, description="p50 latency ceiling at the target batch.")
    max_size_mb: Optional[float] = Field(None, gt=0, description="Model file size ceiling (MB, 1e6 bytes).")
    max_accuracy_drop: Optional[float] = Field(
        1.0, ge=0, le=100, description="Largest allowed validation-accuracy drop vs the teacher, in points."
    )


class TargetConfig(Strict):
    name: str = Field("cpu-1-thread", min_length=1, description="A name for the device profile.")
    threads: int = Field(1, ge=1, le=256, description="Inference threads (1 = one small edge core).")
    batch: int = Field(1, ge=1, le=1024, description="Batch size for latency.")
    warmup: int = Field(20, ge=0, le=100000, description="Warm-up inferences before timing.")
    iterations: int = Field(200, ge=10, le=1000000, description="Timed inferences per model.")
    time_budget_s: Optional[float] = Field(
        None, gt=0, le=3600, description="Instead of a fixed count: time each model for this many seconds.",
    )
    constraints: ConstraintsConfig = ConstraintsConfig()


class DeviceTargetConfig(Strict):
    """A device that measures every variant: an edgeopt agent on it (README 'Devices'), reached over
    HTTP(S). The latency protocol and the constraints are the run's ``target``; each device gets its
    own Pareto front and winner. The first device drives the champion (registry alias) and the
    deploy folder; every other one gets the alias ``<registry.alias>-<label>``."""

    label: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,39}$",
                       description="Short name: in reports, MLflow metric names (<label>.latency_p50_ms) and the "
                                   "device's registry alias (<registry.alias>-<label>).")
    url: str = Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
                     description="The agent's base URL, e.g. http://127.0.0.1:8765 (an SSH tunnel to the device) or "
                                 "https://board-7.lan:8765 (the agent serving TLS).")
    token_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                           description="Name of the environment variable holding the agent's token (never the token "
                                       "itself: configs are committed and logged).")
    ca_file: Optional[Path] = Field(None, description="CA certificate (PEM) that signed an https agent's certificate; "
                                                      "default: the system's.")
    threads: Optional[int] = Field(None, ge=1, le=256, description="Inference threads on this device; default: "
                                                                   "target.threads.")
    timeout_s: float = Field(900.0, gt=0, le=86400, description="Longest wait for this device's evaluation job "
                                                                "(every model, uploaded, measured, answered).")

    @field_validator("ca_file")
    @classmethod
    def _ca_file_exists(cls, v):
        if v is not None and not resolve_path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v


class SelectionConfig(Strict):
    objective: Literal["latency", "size", "accuracy"] = Field(
        "latency", description="Among feasible Pareto-optimal variants, the one best at this wins."
    )


class PromotionConfig(Strict):
    """When the run's winner may replace the current champion (re-measured in the same run)."""

    max_accuracy_loss: float = Field(
        0.5, ge=0, le=100, description="Largest validation-accuracy loss vs the champion (points) a challenger may have."
    )
    min_latency_gain_pct: Optional[float] = Field(
        5.0, ge=0, le=100, description="The challenger's p50 must be at least this much lower than the champion's (%)."
    )
    min_size_gain_pct: Optional[float] = Field(
        None, ge=0, le=100, description="The challenger's file must be at least this much smaller (%); null: no rule."
    )
    replace_unmeasured_champion: bool = Field(
        False, description="When the champion cannot be re-measured on this run's data and target (a changed "
        "image size or class count, a runtime it no longer loads on): false keeps it and promotes nothing; "
        "true lets the winner replace it without a comparison.",
    )


class RegistryConfig(Strict):
    name: str = Field(
        "edgeopt-model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="MLflow registered-model name, also the ZenML model name.",
    )
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")


class TrackingConfig(Strict):
    uri: Optional[str] = Field(
        None, description="MLflow tracking URI; default: sqlite:///<checkout>/.edgeopt/mlflow.db."
    )
    experiment: str = Field(
        "edgeopt", pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$", max_length=200,
        description="MLflow experiment name; a local store keeps its artifacts in mlartifacts/<experiment> "
                    "beside the database, so the name is one plain folder name.",
    )

    @field_validator("uri")
    @classmethod
    def _no_file_store(cls, v):
        if v is not None and (v.startswith("file:") or "://" not in v):
            raise ValueError("MLflow 3 refuses file stores; use sqlite:///path/mlflow.db or an http(s):// server")
        if v is not None and v.startswith("sqlite:///") and not v.startswith("sqlite:////"):
            raise ValueError("a relative SQLite path depends on the working directory; write it absolute "
                             "(sqlite:////abs/path/mlflow.db) or leave tracking.uri unset")
        return v


class DeployConfig(Strict):
    root: Path = Field(Path("deploy"), description="Deploy folder (relative paths are under the checkout).")
    keep: int = Field(5, ge=1, le=1000, description="Bundles kept for rollback.")


class RunConfig(Strict):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    student: Optional[StudentConfig] = Field(None, description="The student to distill; null: none.")
    variants: VariantsConfig = VariantsConfig()
    target: TargetConfig = TargetConfig()
    selection: SelectionConfig = SelectionConfig()
    promotion: PromotionConfig = PromotionConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()
    deploy: DeployConfig = DeployConfig()
    targets: List[DeviceTargetConfig] = Field(
        [], description="Devices that measure the variants, each through its agent; empty: measure on the machine "
                        "that runs evaluate (the default).",
    )

    @field_validator("targets")
    @classmethod
    def _unique_labels(cls, v):
        labels = [t.label for t in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels in {labels}")
        return v

    @model_validator(mode="after")
    def _bases_and_variants(self, info: ValidationInfo):
        if "student" in self.variants.bases and self.student is None:
            raise ValueError("variants.bases names 'student' but there is no student section")
        if (registries := _registries(info)) is not None:
            registries.plan(self)
        return self

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{state_dir() / 'mlflow.db'}"

    def deploy_root(self) -> Path:
        return resolve_path(self.deploy.root)


