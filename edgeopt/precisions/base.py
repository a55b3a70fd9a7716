"""The precision recipe interface and its registry (``edgeopt.precisions`` lists the recipes)."""


from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Any, Callable, ClassVar, Dict, Iterator, List, Tuple

import numpy as np
from pydantic import BaseModel

from edgeopt.artifacts import Dataset, ModelArtifact, model_or_failure, new_workdir
from edgeopt.config.quant import RecipeOptions

if TYPE_CHECKING:
    from edgeopt.config import QuantConfig

log = logging.getLogger(__name__)

IDENTITY = "fp32"  # the export itself: every format has it, no recipe builds it





class Inputs:
    """What a recipe may read besides the model: ``n_calibration`` train images (drawn once, seeded)
    and the val split as (image, label) pairs of one image each, streamed from disk on every pass
    (so a model with a fixed batch of 1 can run them, and a large split is never held in memory)."""

    def __init__(self, dataset: Dataset, n_calibration: int, seed: int = 0):
        self.dataset, self.n_calibration, self.seed = dataset, n_calibration, seed

    @cached_property
    def calibration(self) -> np.ndarray:
        return self.dataset.sample("train", self.n_calibration, self.seed)

    def validation(self) -> "_ValItems":
        return _ValItems(self.dataset)


class _ValItems:
    """Re-iterable (image of shape 1xCxHxW, label) pairs of the val split, with a length."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.size("val")

    def __iter__(self) -> Iterator[Tuple[np.ndarray, int]]:
        for x, y in self.dataset.batches("val", 1):
            yield x, int(y[0])


# src model file, dst model file, the recipe's options, its inputs -> facts for the manifest
Apply = Callable[[Path, Path, Any, Inputs], Dict[str, Any]]

REGISTRY: Dict[str, "Precision"] = {}


class Precision(ABC):
    """One precision recipe. Subclasses set ``name``, ``Options`` and ``implementations`` and define
    ``recipe``; defining the subclass registers an instance under ``name``."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = RecipeOptions
    implementations: ClassVar[Dict[str, Apply]]  # format name -> the function that applies it
    # The CPU must have one of these /proc/cpuinfo flags for the recipe to compute as it says (bf16:
    # avx512_bf16 or amx_bf16); empty: any CPU. ``validate`` refuses it elsewhere (edgeopt.plan.check).
    cpu_flags: ClassVar[Tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name == IDENTITY or (cls.name in REGISTRY
                                        and type(REGISTRY[cls.name]).__qualname__ != cls.__qualname__):
                raise ValueError(f"precision {cls.name!r} is already defined")
            REGISTRY[cls.name] = cls()

    def options(self, quant: BaseModel) -> BaseModel:
        """This recipe's options, read from the fields of the same names in ``quant`` (the run
        config's ``variants.quant``, or an instance of ``Options`` itself); defaults for the rest."""
        return self.Options.model_validate(quant, from_attributes=True)

    def implementation(self, fmt: str) -> Apply:
        if fmt not in self.implementations:
            raise ValueError(f"precision {self.name!r} has no implementation for format {fmt!r} "
                             f"(it applies to {', '.join(self.implementations)})")
        return self.implementations[fmt]

    @abstractmethod
    def recipe(self, fmt: str, options: Any, n_calibration: int) -> Tuple[Dict[str, Any], str]:
        """(every option the recipe uses on ``fmt``, with ``auto`` values resolved; a method a person can read)."""


NATIVE = "native"  # in variants.quantization: every precision this CPU computes in natively (``natives``)


def natives(flags: AbstractSet[str]) -> List[str]:
    """The registered precisions that compute in a precision of the CPU's own and that a CPU with ``flags``
    has one of the flags for (bf16, int8-bf16 with AVX512_BF16 or AMX; fp16-native with AVX512_FP16 or AMX)."""
    return [name for name, p in REGISTRY.items() if p.cpu_flags and flags & set(p.cpu_flags)]


def names() -> Tuple[str, ...]:
    """Every precision a variant can have: fp32, then the registered recipes."""
    return (IDENTITY, *REGISTRY)


def get(name: str) -> Precision:
    if name not in REGISTRY:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(names())}")
    return REGISTRY[name]


def formats_for(name: str) -> Tuple[str, ...]:
    """The formats that ``name`` has an implementation for (fp32: every format)."""
    if name == IDENTITY:
        from edgeopt.formats import FORMATS

        return tuple(FORMATS)
    return tuple(get(name).implementations)


def quantize_model(model: ModelArtifact, precision: str, dataset: Dataset, options: "QuantConfig", seed: int,
                   variant: str) -> ModelArtifact:
    """The ``precision`` variant (named ``variant``) of an FP32 ModelArtifact, calibrated on
    ``options.calibration_samples`` train images drawn with ``seed``.

    'fp32' returns the input. An unknown precision, or one without an implementation for the
    model's format, raises ValueError; any failure while building is recorded in a failed
    ModelArtifact instead (with the recipe and lineage), so one bad variant does not sink a run.
    """
    if precision == IDENTITY:
        return model
    recipe_ = get(precision)
    apply = recipe_.implementation(model.format)
    opts = recipe_.options(options)
    n_calibration = min(options.calibration_samples, dataset.size("train"))
    used, method = recipe_.recipe(model.format, opts, n_calibration)
    recipe = {**model.manifest["recipe"], "scheme": precision, **used}
    lineage = {**model.manifest.get("lineage", {}), "parent": model.variant}

    def build() -> ModelArtifact:
        if model.failed:
            raise RuntimeError(f"parent {model.variant} failed: {model.manifest['reason']}")
        out = new_workdir(variant)
        facts = apply(model.model_file, out / model.model_file.name, opts, Inputs(dataset, n_calibration, seed))
        art = ModelArtifact.write(out, {
            **{k: v for k, v in model.manifest.items() if k not in ("files", "kind", "parity_max_abs_diff")},
            "variant": variant, "recipe": recipe, "lineage": lineage, "method": method, **facts,
        })
        log.info("quantize: %s %.1f kB -> %.1f kB (%s)", variant, model.model_bytes / 1e3, art.model_bytes / 1e3,
                 method)
        return art

    return model_or_failure(build, variant=variant, fmt=model.format, recipe=recipe, lineage=lineage)

