"""The technique interface, its options and its registry (``edgeopt.shrink`` lists the techniques)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from torch import nn

    from edgeopt.artifacts import Dataset


class TechniqueOptions(BaseModel):
    """What every technique takes: the amounts to try and the KD fine-tune after the change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amounts: List[Annotated[float, Field(gt=0, lt=1)]] = Field(
        min_length=1, description="One variant per amount (a ratio, an energy, a sparsity: see the technique)."
    )
    finetune_epochs: int = Field(3, ge=0, le=1000, description="KD fine-tune epochs after the change.")
    finetune_steps: Optional[int] = Field(
        None, ge=1, le=10_000_000, description="KD fine-tune optimizer steps (instead of finetune_epochs).",
    )
    lr: float = Field(0.005, gt=0, le=10, description="Fine-tune learning rate.")
    feature_kd: float = Field(
        0.0, ge=0, le=100,
        description="Weight of intermediate-feature distillation in the fine-tune (0: off): the changed model's "
                    "outputs of every layer whose output kept its shape (with prune keep_residual, each block's "
                    "output projection; each low-rank factorized layer) matched to the unchanged base's.",
    )

    @field_validator("amounts")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v


@dataclass
class ShrinkContext:
    """What a technique may need besides the model: the data (e.g. gradients for Taylor
    importance), the input shape, the class count, the seed, and a way to rebuild the unchanged
    base model (e.g. to compare against it)."""

    dataset: "Dataset"
    input_shape: List[int]
    num_classes: int
    seed: int
    load_base: Callable[[], "nn.Module"]


# What ``apply`` returns: manifest facts about the change, and an optional hook run after the KD
# fine-tune that returns more facts (sparsity bakes its mask there: the fine-tune trains through it).
Applied = Tuple[Dict[str, Any], Optional[Callable[[], Dict[str, Any]]]]

REGISTRY: Dict[str, "Technique"] = {}


class Technique(ABC):
    name: ClassVar[str]
    tag: ClassVar[str]  # variant-name prefix: p50, lr90, sp50
    role: ClassVar[str]  # the checkpoint's role: pruned, lowrank, sparse
    Options: ClassVar[type[TechniqueOptions]] = TechniqueOptions

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in REGISTRY and type(REGISTRY[cls.name]).__qualname__ != cls.__qualname__:
                raise ValueError(f"technique {cls.name!r} is already registered by {type(REGISTRY[cls.name]).__module__}")
            REGISTRY[cls.name] = cls()

    def variant_tag(self, amount: float) -> str:
        return f"{self.tag}{round(amount * 100)}"

    @abstractmethod
    def recipe(self, amount: float, opts: TechniqueOptions) -> str:
        """One line a person reads, e.g. 'structured channel pruning 50 % (l2, per layer)'."""

    @abstractmethod
    def apply(self, model: "nn.Module", amount: float, opts: TechniqueOptions, ctx: ShrinkContext) -> Applied:
        """Change ``model`` in place (before the KD fine-tune)."""


def output_layers(model: "nn.Module", num_classes: int) -> List["nn.Module"]:
    """The classifier layers (Linear or Conv2d with ``num_classes`` outputs): never shrunk."""
    from torch import nn

    return [
        m for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)
    ]


def get(name: str) -> Technique:
    if name not in REGISTRY:
        raise ValueError(f"unknown technique {name!r}; expected one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def parse_options(raw: Dict[str, Any]) -> Dict[str, TechniqueOptions]:
    """``variants.shrink`` ({technique: options}) validated against each technique's schema."""
    from pydantic import ValidationError

    out = {}
    for name, opts in raw.items():
        technique = get(name)
        if isinstance(opts, technique.Options):
            out[name] = opts
            continue
        try:
            out[name] = technique.Options.model_validate(opts)
        except ValidationError as err:
            e = err.errors()[0]
            where = ".".join(str(p) for p in (name, *e["loc"]))
            msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            raise ValueError(f"{where}: {msg}") from None
    return out

