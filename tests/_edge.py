"""What tests/test_executorch.py and tests/test_litert.py share: one of each kind of base (built once per
session), a network with an operator neither edge format takes, and the accuracy of a predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from edgeopt.artifacts import Checkpoint, Dataset, new_workdir
from edgeopt.config.training import TeacherConfig
from edgeopt.models.brought import onnx_teacher
from edgeopt.models.zoo import load_checkpoint
from edgeopt.shrink.lowrank import LowRankOptions
from edgeopt.shrink.prune import PruneOptions
from edgeopt.shrink.run import shrink_base
from edgeopt.train.teacher import train_teacher

SHAPE = [1, 8, 8]
KINDS = ("teacher", "student", "pruned", "lowrank", "brought-checkpoint", "brought-onnx")
_BASES: Dict[str, Checkpoint] = {}


def bases(digits: Dataset, teacher: Checkpoint, student: Checkpoint) -> Dict[str, Checkpoint]:
    """A trained teacher, a distilled student, the student pruned by half and the teacher factorized (each
    fine-tuned one epoch), the teacher's weights brought as a state dict, and the teacher brought as an
    ONNX file the way most users export (batch 1, a softmax inside, the TorchScript exporter)."""
    if not _BASES:
        folder = new_workdir("brought")
        weights = folder / "teacher.pt"
        torch.save(load_checkpoint(teacher).state_dict(), weights)
        arch = teacher.manifest["arch"]
        onnx_file = folder / "teacher.onnx"
        torch.onnx.export(nn.Sequential(load_checkpoint(teacher), nn.Softmax(1)).eval(), (torch.zeros(1, *SHAPE),),
                          str(onnx_file), dynamo=False, opset_version=17, input_names=["image"], output_names=["prob"])
        _BASES.update({
            "teacher": teacher,
            "student": student,
            "pruned": shrink_base(student, teacher, digits, "prune", 0.5,
                                  PruneOptions(amounts=[0.5], finetune_epochs=1, lr=0.02, round_to=None)),
            "lowrank": shrink_base(teacher, teacher, digits, "lowrank", 0.5,
                                   LowRankOptions(amounts=[0.5], finetune_epochs=1, lr=0.02)),
            "brought-checkpoint": train_teacher(digits, TeacherConfig(arch=arch["name"], width=arch["width"],
                                                                      checkpoint=weights)),
            "brought-onnx": onnx_teacher(onnx_file, digits),
        })
    return _BASES


class AdaptiveMaxPool(nn.Module):
    """A small CNN whose pooling is an adaptive max pool to 3x3 (aten.adaptive_max_pool2d): neither the
    Core ATen opset (ExecuTorch) nor litert-torch has it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 9, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_max_pool2d(torch.relu(self.conv(x)), 3), 1))


def accuracy(predict, digits: Dataset, split: str = "test") -> float:
    x, y = digits.split(split)
    return float((predict(x).argmax(1) == y).mean())


def files(folder: Path) -> set:
    return {p.name for p in folder.iterdir()}
