"""Intermediate-feature distillation (FitNets, Romero et al. 2015) after a shrink that kept some layers'
output shape: which layers match (:func:`shape_kept_layers`), their outputs (:func:`layer_outputs`), the loss
(:func:`feature_loss`); ``edgeopt.train.fit.fit`` adds it to the KD loss when given a :class:`FeatureKD`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FeatureKD:
    """Intermediate-feature distillation: the outputs of the student's modules named ``layers`` matched
    to those of ``teacher``'s modules of the same names (the model before a shrink: each layer whose
    output kept its shape, :func:`shape_kept_layers`). Each layer's term is the mean squared difference
    over the mean square of the teacher's feature (a scale-free error, so that no layer dominates); their
    mean, times ``weight``, is added to the loss. ``teacher`` may be the logits teacher itself (one
    forward pass serves both)."""

    teacher: nn.Module
    layers: List[str]
    weight: float


@torch.no_grad()
def shape_kept_layers(student: nn.Module, teacher: nn.Module, input_shape) -> List[str]:
    """The names of ``teacher``'s (non-depthwise) convolutions whose module of the same name in
    ``student`` gives an output of the same shape: after pruning that keeps the residual streams, each
    block's output projection; after a low-rank factorization, each factorized layer (a Sequential of
    two convolutions under the same name). A convolution a BatchNorm was added behind
    (``edgeopt.models.zoo.add_batchnorm``) is matched with that BatchNorm. ``input_shape``: one image's
    (channels, height, width)."""
    convs = [n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    student_modules = dict(student.named_modules())
    names = [n for n in convs if n in student_modules]
    x = torch.zeros(1, *input_shape)
    shapes = [layer_outputs(model, names, x) for model in (teacher, student)]
    return [n for n in names if n in shapes[0] and n in shapes[1] and shapes[0][n].shape == shapes[1][n].shape]


def layer_outputs(model: nn.Module, names: List[str], x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The outputs of ``model``'s modules named ``names`` on ``x`` (in eval mode)."""
    captured: Dict[str, torch.Tensor] = {}
    hooks = capture(model, names, captured)
    was_training = model.training
    try:
        model.eval()(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return captured


def capture(model: nn.Module, names: List[str], into: Dict[str, torch.Tensor]) -> list:
    """Forward hooks that store the outputs of `model`'s modules named `names` in `into` (remove them after)."""
    modules = dict(model.named_modules())

    def hook(name: str):
        return lambda _m, _i, out: into.__setitem__(name, out)

    return [modules[n].register_forward_hook(hook(n)) for n in names]


def feature_loss(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the layers of ||s - t||^2 / ||t||^2 (per element means)."""
    terms = [F.mse_loss(student[n], teacher[n]) / teacher[n].pow(2).mean().clamp_min(1e-12) for n in teacher]
    return torch.stack(terms).mean()
