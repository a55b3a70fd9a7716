"""What several test modules share without importing conftest (which pytest loads once, as ``conftest``):
the checkout's root and the tiny run config."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "digits"},
    "teacher": {"arch": "resnet_small", "width": 8, "epochs": 4, "lr": 0.05},
    "student": {"arch": "small_cnn", "width": 8, "epochs": 6, "lr": 0.05},
    "variants": {
        "bases": ["student"],
        # round_to null: exact ratios (under the default 8, these width-8 nets' 8-channel layers stay whole)
        "shrink": {"prune": {"amounts": [0.5], "finetune_epochs": 2, "lr": 0.02, "round_to": None}},
        "quantization": ["fp32", "int8"],
        "formats": ["onnx", "openvino"],
        "runtimes": ["onnxruntime", "openvino"],
        "quant": {"calibration_samples": 64},
    },
    "target": {"warmup": 5, "iterations": 30, "constraints": {"max_accuracy_drop": 10.0, "max_size_mb": 1.0}},
    "registry": {"name": "tiny-model"},
    "tracking": {"experiment": "tiny"},
}
