"""Our own training step: a small CNN of our own design, trained on edgeopt's Dataset artifact and
handed to edgeopt's steps as an ONNX model, the way edgeopt takes any model brought to it."""

import tempfile
from pathlib import Path
from typing import Annotated

import torch
from torch import nn
from zenml import step

from edgeopt.artifacts import Checkpoint, Dataset
from edgeopt.models.brought import onnx_teacher
from edgeopt.models.export import export_onnx
from edgeopt_zenml.materializers import CheckpointMaterializer


def small_cnn(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))


@step(output_materializers=CheckpointMaterializer)
def train_classifier(dataset: Dataset, epochs: int, lr: float, seed: int) -> Annotated[Checkpoint, "teacher"]:
    """Train on the train split (Adam, cross-entropy), then export to ONNX and wrap it as edgeopt's
    base model (its checks run the file on validation images)."""
    torch.manual_seed(seed)
    model = small_cnn(dataset.input_shape[0], len(dataset.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        for x, y in dataset.batches("train", 64, shuffle=True, seed=seed + epoch):
            loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        return onnx_teacher(export_onnx(model.eval(), dataset.input_shape, Path(tmp) / "model.onnx"), dataset)
