"""The run configuration's schema: plain data (pydantic), with the checks a field can make alone.

Checks against the registries (is this precision, format, runtime or technique known; does the plan
have a variant of every base) are ``edgeopt.plan.check``'s: it validates this schema with itself as the
validation context, so this module imports no registry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Literal, Optional, Tuple

from pydantic import AfterValidator, Field, ModelWrapValidatorHandler, ValidationInfo, field_validator, model_validator

from edgeopt.config.base import Strict
from edgeopt.config.data import MAX_IMAGE_SIDE, DataConfig, SplitConfig  # noqa: F401
from edgeopt.config.paths import anchored, config_folder, resolve_path, state_dir
from edgeopt.config.quant import QuantConfig
from edgeopt.config.training import StudentConfig, TeacherConfig

MAX_LIST_ITEMS = 32


def _registries(info: ValidationInfo) -> Any:
    """The registry checks of ``edgeopt.plan.check`` when it validates; None for the schema alone."""
    return (info.context or {}).get("registries")


def _known_precision(name: str, info: ValidationInfo) -> str:
    if (registries := _registries(info)) is not None:
        registries.precision(name)  # raises ValueError naming the known ones
    return name


def _by_technique(v: Any, info: ValidationInfo, expected: str, check: str) -> Any:
    """A mapping technique -> its section, checked by the registries' ``check`` when they validate."""
    if not isinstance(v, dict):
        raise ValueError(f"expected a mapping {expected}")
    registries = _registries(info)
    return v if registries is None else getattr(registries, check)(v)


# A precision: fp32 or a recipe registered in edgeopt.precisions (fp16, int8, int8-dynamic, int8-acc, ...);
# which formats each applies to: edgeopt.precisions.formats_for.
Scheme = Annotated[str, AfterValidator(_known_precision)]


BASES = ("teacher", "student")


class SearchRange(Strict):
    """One technique's part of the search space (``variants.search.shrink.<technique>``): the amounts as a
    range, the options to choose among, and the technique's own options (its KD fine-tune included),
    which every trial and every survivor gets."""

    range: Tuple[float, float] = Field(description="[lo, hi]: the amounts tried (a ratio, an energy, a sparsity), "
                                                   "0 < lo < hi < 1.")
    step: float = Field(0.05, gt=0, lt=1, description="Amounts are multiples of this (from lo): trials stay on a "
                                                      "lattice, so the same amount is never fine-tuned twice.")
    choices: Dict[str, List[Any]] = Field(
        {}, description="Technique options to choose among, e.g. {importance: [l2, fpgm], round_to: [8, 16]}; "
                        "each value is checked against the technique's schema.",
    )
    options: Any = Field(None, description="The technique's options (TechniqueOptions) once checked against the "
                                           "registry; every other field of the section goes here.")

    @field_validator("range")
    @classmethod
    def _ordered(cls, v):
        if not 0 < v[0] < v[1] < 1:
            raise ValueError(f"expected 0 < lo < hi < 1, got {list(v)}")
        return v

    @field_validator("choices")
    @classmethod
    def _few_choices(cls, v):
        for name, values in v.items():
            if not isinstance(values, list) or not values or len(values) > MAX_LIST_ITEMS:
                raise ValueError(f"{name}: a list of 1 to {MAX_LIST_ITEMS} values")
        return v


class SearchBudget(Strict):
    trials: Optional[int] = Field(16, ge=1, le=10000, description="Trials in the study, every worker and resumed "
                                                                  "run together; null: only the wall limit.")
    wall_minutes: Optional[float] = Field(None, gt=0, le=10080, description="A worker starts no trial after this "
                                                                            "many minutes; null: only the trials.")

    @model_validator(mode="after")
    def _some_limit(self):
        if self.trials is None and self.wall_minutes is None:
            raise ValueError("set trials, wall_minutes or both")
        return self


class SearchConfig(Strict):
    """``variants.search``: instead of the grid of ``variants.shrink`` amounts, an Optuna study over the
    structural techniques' amounts (``shrink``: ranges), each trial measured on the target before any
    fine-tune; ``variants.bases``, ``quantization``, ``formats`` and ``runtimes`` are its other
    dimensions, every combination measured per trial (docs/search.md)."""

    shrink: Dict[str, Any] = Field(
        min_length=1, description="technique -> {range: [lo, hi], step, choices: {option: [values]}, and the "
                                  "technique's options: finetune_steps or finetune_epochs, lr, importance, round_to ...}.",
    )
    budget: SearchBudget = SearchBudget()
    sampler: Literal["tpe", "gp"] = Field(
        "tpe", description="tpe: Optuna's TPESampler(multivariate=True, constant_liar=True); gp: GPSampler.",
    )
    seed: Optional[int] = Field(None, ge=0, description="The sampler's seed; default: the run's seed.")
    start_from_grid: bool = Field(True, description="Enqueue the amounts of variants.shrink (same technique) as "
                                                    "the first trials.")
    survivors: int = Field(2, ge=1, le=16, description="Candidates per base that get the full fine-tune, every "
                                                       "precision and the pipeline's evaluation (variants <base>-s1...).")
    short_finetune: float = Field(0.3, gt=0, le=1, description="The longest fine-tune inside the study, as a fraction "
                                                               "of the technique's full fine-tune.")
    rungs: int = Field(2, ge=1, le=5, description="Successive-halving rungs up to the short fine-tune.")
    reduction_factor: int = Field(3, ge=2, le=10, description="Successive halving: a rung keeps the best "
                                                              "1/reduction_factor and is this much longer than the last.")
    accuracy_slack: float = Field(0.5, ge=0, le=100, description="Points of accuracy drop allowed beyond "
                                                                 "target.constraints.max_accuracy_drop after a short "
                                                                 "fine-tune (the full one recovers more).")
    calibration_samples: int = Field(32, ge=1, le=100000, description="Calibration images of the latency-only "
                                                                      "quantization inside a trial.")
    workers: int = Field(1, ge=1, le=32, description="Pipeline steps that run trials of the one study (in parallel "
                                                     "where the orchestrator runs steps in parallel).")
    storage: Optional[str] = Field(
        None, description="Optuna RDB storage URL, e.g. postgresql://user@host/db; default: search.db beside a "
                          "SQLite tracking store, else in edgeopt's state folder.",
    )
    study: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$",
                                 description="Study name; default: the run name and a hash of what the trials "
                                             "depend on (config, data, base models).")

    @field_validator("shrink", mode="before")
    @classmethod
    def _technique_ranges(cls, v, info: ValidationInfo):
        return _by_technique(v, info, "{technique: {range: [lo, hi], ...}}", "search_space")

    @field_validator("storage")
    @classmethod
    def _rdb(cls, v):
        if v is not None and not v.startswith(("sqlite:////", "postgresql", "mysql")):
            raise ValueError("an SQLAlchemy URL of a database: sqlite:////abs/path.db (absolute), postgresql://..., "
                             "mysql://...")
        return v


class VariantsConfig(Strict):
    bases: List[Literal["teacher", "student"]] = Field(
        ["teacher"], min_length=1,
        description="Models that variants are made of: 'teacher' (the trained or brought model) and 'student' "
                    "(the distilled one); default: the teacher, and the student when there is a student section. "
                    "The teacher's FP32 ONNX is always measured: it is the reference.",
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
                    "int8-acc (NNCF accuracy-controlled PTQ), int8-qat, bf16 / fp16-native / int8-bf16 (OpenVINO "
                    "on a CPU that has them), native (those of the three this CPU has, none elsewhere)",
    )
    formats: List[str] = Field(["onnx", "openvino"], min_length=1, description="Export formats (edgeopt.formats).")
    runtimes: List[str] = Field(
        ["onnxruntime", "openvino"], min_length=1,
        description="Runtimes to evaluate on (edgeopt.runtimes); each format runs on the runtimes that can read it.",
    )
    quant: QuantConfig = QuantConfig()
    search: Optional[SearchConfig] = Field(
        None, description="Search instead of the grid: the structural amounts as ranges, an Optuna study measured "
                          "on the target before any fine-tune; null: the grid of variants.shrink.",
    )

    @field_validator("bases", "quantization", "formats", "runtimes", mode="before")
    @classmethod
    def _short(cls, v):
        if isinstance(v, (list, tuple)) and len(v) > MAX_LIST_ITEMS:  # before validating each item of a huge list
            raise ValueError(f"at most {MAX_LIST_ITEMS} entries, got {len(v)}")
        return v

    @field_validator("quantization", mode="before")
    @classmethod
    def _native(cls, v, info: ValidationInfo):
        """``native``: the precisions this CPU computes in natively, those not listed already (none on a CPU
        without AVX512_BF16, AVX512_FP16 or AMX: a config that asks for them runs on any CPU)."""
        registries = _registries(info)
        if registries is None or not isinstance(v, list) or "native" not in v:
            return v
        own = [p for p in registries.native_precisions() if p not in v]
        i = v.index("native")
        return v[:i] + own + v[i + 1:]

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
        return _by_technique(v, info, "{technique: options}", "techniques")


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
    """A device that measures every variant: an edgeopt agent on it (docs/devices-agent.md), reached over
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
        None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI when set, else the stack's MLflow "
                          "experiment tracker (edgeopt run), else sqlite:///<state dir>/mlflow.db."
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
    enabled: bool = Field(True, description="false: export only: the run selects, tracks and reports its winner "
                                            "(edgeopt optimize --output writes its files) but promotes nothing to the "
                                            "registry and deploys nothing.")
    root: Path = Field(Path("deploy"), description="Deploy folder (relative to the config file's folder).")
    keep: int = Field(5, ge=1, le=1000, description="Bundles kept for rollback.")


class ChecksConfig(Strict):
    """What is checked before any step starts, beyond the inputs' pre-flight."""

    near_chance: Literal["refuse", "warn"] = Field(
        "refuse", description="A brought model that scores near chance on the validation split (usually a "
                              "normalization, class order or resize that does not match how it was trained): refuse "
                              "the run with the reason (default), or warn and go on (--force).",
    )


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
    checks: ChecksConfig = ChecksConfig()
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

    @model_validator(mode="before")
    @classmethod
    def _bases_follow_sections(cls, data: Any) -> Any:
        """Without ``variants.bases``: the teacher, and the student when the config has a student section."""
        if isinstance(data, dict) and isinstance(data.get("variants", {}), dict) and "bases" not in data.get("variants", {}):
            bases = ["teacher", "student"] if data.get("student") is not None else ["teacher"]
            data = {**data, "variants": {**data.get("variants", {}), "bases": bases}}
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _paths_from_config_folder(cls, data: Any, handler: ModelWrapValidatorHandler["RunConfig"],
                                  info: ValidationInfo) -> "RunConfig":
        """With ``config_dir`` in the validation context (the config file's folder), every relative path is
        checked under it and then written as the run reads it (:func:`edgeopt.config.paths.anchored`)."""
        folder = (info.context or {}).get("config_dir")
        with config_folder(folder):
            cfg = handler(data)
        return cfg if folder is None else cfg.map_paths(lambda p: anchored(p, folder))

    def map_paths(self, fn: Callable[[Optional[Path]], Optional[Path]]) -> "RunConfig":
        """This config with ``fn`` applied to every file or folder path in it."""
        data = self.data.model_copy(update={"root": fn(self.data.root), "labels": (
            fn(self.data.labels) if isinstance(self.data.labels, Path) else self.data.labels)})
        teacher = self.teacher.model_copy(update={"checkpoint": fn(self.teacher.checkpoint), "onnx": fn(self.teacher.onnx)})
        student = self.student and self.student.model_copy(update={"checkpoint": fn(self.student.checkpoint)})
        return self.model_copy(update={
            "data": data, "teacher": teacher, "student": student,
            "deploy": self.deploy.model_copy(update={"root": fn(self.deploy.root)}),
            "targets": [t.model_copy(update={"ca_file": fn(t.ca_file)}) for t in self.targets],
        })

    def tracking_uri(self) -> str:
        """``tracking.uri``, else ``MLFLOW_TRACKING_URI`` (MLflow's own convention), else the embedded store."""
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"

    def deploy_root(self) -> Path:
        return resolve_path(self.deploy.root)


