"""The run configuration: one pydantic schema, validated up front, before any work starts.

A bad file fails fast with one line naming the field's path and what was expected, e.g.::

    configs/bad.yaml: target.constraints.max_latency_ms: Input should be greater than 0 (got -3)
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, List, Literal, Optional, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent

Runtime = Literal["onnxruntime", "openvino"]
Format = Literal["onnx", "openvino"]
Scheme = Literal["fp32", "fp16", "int8", "int8-dynamic", "int8-acc"]

# Which runtime can run which exported format. OpenVINO reads ONNX too; ONNX Runtime cannot read IR.
RUNTIMES_FOR_FORMAT = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",)}
# Which precision schemes each format supports (dynamic INT8 is an ONNX Runtime technique).
SCHEMES_FOR_FORMAT = {
    "onnx": ("fp32", "fp16", "int8", "int8-dynamic", "int8-acc"),
    "openvino": ("fp32", "fp16", "int8", "int8-acc"),
}


# Names of edgeopt.models.ARCHITECTURES, listed here so that validating a config imports no torch.
ARCHITECTURE_NAMES = (
    "small_cnn", "resnet_small", "resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "squeezenet1_1", "efficientnet_b0",
)


class ConfigError(ValueError):
    """A configuration problem, already phrased as one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Strict):
    val: float = Field(0.15, gt=0, lt=0.5, description="Fraction of the data held out for validation.")
    test: float = Field(0.25, gt=0, lt=0.5, description="Fraction of the data held out for the final test.")


class DataConfig(_Strict):
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
        return v

    @model_validator(mode="after")
    def _mean_std_together(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std go together: set both or neither")
        if self.std is not None and (len(self.std) != len(self.mean) or min(self.std) <= 0):
            raise ValueError("data.std: one positive value per channel, as many as data.mean")
        return self

    @model_validator(mode="after")
    def _root_for_imagefolder(self):
        if self.source == "imagefolder":
            if self.root is None:
                raise ValueError("data.root is required when data.source is 'imagefolder'")
            root = self.root if self.root.is_absolute() else PROJECT_ROOT / self.root
            if not root.is_dir():
                raise ValueError(f"data.root: folder not found: {self.root}")
        return self


class TrainConfig(_Strict):
    arch: str = Field(description="Architecture name from edgeopt.models.ARCHITECTURES.")
    width: int = Field(16, ge=1, le=512, description="Base channel width of the small architectures.")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(0.01, gt=0, le=10)
    weight_decay: float = Field(5e-4, ge=0, le=1)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v):
        if v not in ARCHITECTURE_NAMES:
            raise ValueError(f"unknown architecture {v!r}; expected one of {', '.join(ARCHITECTURE_NAMES)}")
        return v


class TeacherConfig(TrainConfig):
    checkpoint: Optional[Path] = Field(
        None, description="Load the teacher from this state dict (.pt/.pth, or .safetensors) for `arch` "
                          "instead of training it.",
    )
    onnx: Optional[Path] = Field(None, description="Use this ONNX model as the teacher instead of training one.")

    @model_validator(mode="after")
    def _one_source(self):
        if self.checkpoint is not None and self.onnx is not None:
            raise ValueError("set at most one of teacher.checkpoint and teacher.onnx")
        for field, suffixes in (("checkpoint", (".pt", ".pth", ".safetensors")), ("onnx", (".onnx",))):
            path = getattr(self, field)
            if path is None:
                continue
            if path.suffix not in suffixes:
                raise ValueError(f"teacher.{field}: expected a {'/'.join(suffixes)} file, got {path.name}")
            if not (path if path.is_absolute() else PROJECT_ROOT / path).is_file():
                raise ValueError(f"teacher.{field}: file not found: {path}")
        return self

    @property
    def source(self) -> Optional[Path]:
        return self.checkpoint or self.onnx


class KDConfig(_Strict):
    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T (Hinton: 4).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KD term; 1-alpha weighs the hard-label CE.")


class StudentConfig(TrainConfig):
    kd: KDConfig = KDConfig()


class FinetuneConfig(_Strict):
    finetune_epochs: int = Field(3, ge=0, le=1000, description="KD fine-tune epochs after the change.")
    lr: float = Field(0.005, gt=0, le=10, description="Fine-tune learning rate.")


class PruneConfig(FinetuneConfig):
    """Structured channel pruning (torch-pruning): the model gets physically smaller."""

    importance: Literal["l1", "l2", "taylor", "bn_scale", "fpgm", "random"] = Field(
        "l2", description="Channel importance criterion (torch-pruning importances).",
    )
    global_pruning: bool = Field(False, description="Rank channels across all layers instead of per layer.")
    iterative_steps: int = Field(1, ge=1, le=100, description="Reach the ratio in this many pruning steps.")


class LowRankConfig(FinetuneConfig):
    """Truncated-SVD factorization of Linear and Conv layers (k x k conv -> k x k to rank r, then 1x1)."""

    min_params_saved: float = Field(
        0.1, ge=0, lt=1, description="Factorize a layer only when it saves at least this fraction of its weights.",
    )


class SparsityConfig(FinetuneConfig):
    """Unstructured magnitude pruning: zeros in dense tensors (smaller once compressed, no speedup)."""

    global_pruning: bool = Field(True, description="One magnitude threshold across all layers.")


class OrtQuantConfig(_Strict):
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field("minmax")
    per_channel: bool = Field(True, description="Per-channel weight scales.")
    activation_type: Literal["int8", "uint8"] = Field(
        "int8", description="int8: S8S8 (ORT's first choice on x86); uint8: U8S8."
    )
    reduce_range: bool = Field(False, description="7-bit weights (helps U8S8 on AVX2/AVX512 without VNNI).")


class NNCFQuantConfig(_Strict):
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="performance: symmetric; mixed: asymmetric activations."
    )
    subset_size: int = Field(300, ge=1, le=100000, description="Calibration samples NNCF uses (<= calibration_samples).")
    fast_bias_correction: bool = True


class AccuracyControlConfig(_Strict):
    max_drop: float = Field(1.0, gt=0, le=100, description="Largest accuracy drop vs FP32 on the val split (points).")
    max_iterations: int = Field(20, ge=1, le=1000, description="Most layers reverted to FP32.")


class QuantConfig(_Strict):
    calibration_samples: int = Field(
        200, ge=1, le=100000, description="Calibration images drawn from the train split."
    )
    onnxruntime: OrtQuantConfig = OrtQuantConfig()
    nncf: NNCFQuantConfig = NNCFQuantConfig()
    accuracy_control: AccuracyControlConfig = AccuracyControlConfig()


class VariantsConfig(_Strict):
    prune_ratios: List[Annotated[float, Field(ge=0, lt=1)]] = Field(
        [0.0, 0.5], min_length=1, description="Structured channel-pruning ratios; 0 means the unpruned student."
    )
    lowrank_energies: List[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [], description="Low-rank variants: keep this fraction of each layer's singular-value energy.",
    )
    sparsities: List[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [], description="Unstructured magnitude-pruning ratios (fraction of weights set to zero).",
    )
    quantization: List[Scheme] = Field(
        ["fp32", "int8"], min_length=1,
        description="fp32, fp16, int8 (static PTQ: ORT QDQ / NNCF), int8-dynamic (ORT, ONNX only), "
                    "int8-acc (NNCF accuracy-controlled PTQ)",
    )
    formats: List[Format] = Field(["onnx", "openvino"], min_length=1)
    runtimes: List[Runtime] = Field(
        ["onnxruntime", "openvino"], min_length=1,
        description="Runtimes to evaluate on; each format runs on the runtimes that can read it.",
    )
    prune: PruneConfig = PruneConfig()
    lowrank: LowRankConfig = LowRankConfig()
    sparsity: SparsityConfig = SparsityConfig()
    quant: QuantConfig = QuantConfig()

    @field_validator("prune_ratios", "lowrank_energies", "sparsities", "quantization", "formats", "runtimes")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v

    @model_validator(mode="after")
    def _some_variant(self):
        if not self.combinations():
            raise ValueError(
                f"no variant: no format in {self.formats} runs on a runtime in {self.runtimes} with a scheme in "
                f"{self.quantization} (onnx runs on onnxruntime/openvino, openvino IR on openvino; "
                f"int8-dynamic is ONNX-only)"
            )
        return self

    def shrinks(self) -> List[Tuple[str, float, str]]:
        """(method, amount, tag) of every structural recipe: ``none`` (the student), ``prune``,
        ``lowrank``, ``sparsity``; the tag names the variant, e.g. p50, lr90, sp50."""
        return (
            [("none" if r == 0 else "prune", r, f"p{round(r * 100)}") for r in self.prune_ratios]
            + [("lowrank", e, f"lr{round(e * 100)}") for e in self.lowrank_energies]
            + [("sparsity", s, f"sp{round(s * 100)}") for s in self.sparsities]
        )

    def combinations(self) -> List[Tuple[str, str, str, str]]:
        """(shrink tag, format, scheme, runtime) for every variant of the student."""
        return [
            (tag, f, s, rt)
            for (_, _, tag), f, s, rt in itertools.product(self.shrinks(), self.formats, self.quantization, self.runtimes)
            if rt in RUNTIMES_FOR_FORMAT[f] and s in SCHEMES_FOR_FORMAT[f]
        ]


class ConstraintsConfig(_Strict):
    max_latency_ms: Optional[float] = Field(None, gt=0, description="p50 latency ceiling at the target batch.")
    max_size_mb: Optional[float] = Field(None, gt=0, description="Model file size ceiling (MB, 1e6 bytes).")
    max_accuracy_drop: Optional[float] = Field(
        1.0, ge=0, le=100, description="Largest allowed test-accuracy drop vs the teacher, in points."
    )


class TargetConfig(_Strict):
    name: str = Field("cpu-1-thread", min_length=1, description="A name for the device profile.")
    threads: int = Field(1, ge=1, le=256, description="Inference threads (1 = one small edge core).")
    batch: int = Field(1, ge=1, le=1024, description="Batch size for latency.")
    warmup: int = Field(20, ge=0, le=100000, description="Warm-up inferences before timing.")
    iterations: int = Field(200, ge=10, le=1000000, description="Timed inferences per model.")
    time_budget_s: Optional[float] = Field(
        None, gt=0, le=3600, description="Instead of a fixed count: time each model for this many seconds.",
    )
    constraints: ConstraintsConfig = ConstraintsConfig()


class SelectionConfig(_Strict):
    objective: Literal["latency", "size", "accuracy"] = Field(
        "latency", description="Among feasible Pareto-optimal variants, the one best at this wins."
    )


class PromotionConfig(_Strict):
    """When the run's winner may replace the current champion (re-measured in the same run)."""

    max_accuracy_loss: float = Field(
        0.5, ge=0, le=100, description="Largest test-accuracy loss vs the champion (points) a challenger may have."
    )
    min_latency_gain_pct: Optional[float] = Field(
        5.0, ge=0, le=100, description="The challenger's p50 must be at least this much lower than the champion's (%)."
    )
    min_size_gain_pct: Optional[float] = Field(
        None, ge=0, le=100, description="The challenger's file must be at least this much smaller (%); null: no rule."
    )


class RegistryConfig(_Strict):
    name: str = Field(
        "edgeopt-model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="MLflow registered-model name, also the ZenML model name.",
    )
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")


class TrackingConfig(_Strict):
    uri: Optional[str] = Field(
        None, description="MLflow tracking URI; default: sqlite:///<checkout>/.edgeopt/mlflow.db."
    )
    experiment: str = Field("edgeopt", min_length=1)

    @field_validator("uri")
    @classmethod
    def _no_file_store(cls, v):
        if v is not None and (v.startswith("file:") or "://" not in v):
            raise ValueError("MLflow 3 refuses file stores; use sqlite:///path/mlflow.db or an http(s):// server")
        return v


class DeployConfig(_Strict):
    root: Path = Field(Path("deploy"), description="Deploy folder (relative paths are under the checkout).")
    keep: int = Field(5, ge=1, le=1000, description="Bundles kept for rollback.")


class RunConfig(_Strict):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    student: StudentConfig
    variants: VariantsConfig = VariantsConfig()
    target: TargetConfig = TargetConfig()
    selection: SelectionConfig = SelectionConfig()
    promotion: PromotionConfig = PromotionConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()
    deploy: DeployConfig = DeployConfig()

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{state_dir() / 'mlflow.db'}"

    def deploy_root(self) -> Path:
        return self.deploy.root if self.deploy.root.is_absolute() else PROJECT_ROOT / self.deploy.root


def state_dir() -> Path:
    """Where edgeopt keeps its local state (MLflow store, artifacts); inside the checkout."""
    d = PROJECT_ROOT / ".edgeopt"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _format_error(source: str, err: ValidationError) -> str:
    e = err.errors()[0]
    path = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field"
    shown = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {path}: {msg}{shown}{more}"


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return parse_config(raw, str(path))
