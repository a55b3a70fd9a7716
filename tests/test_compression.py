"""The domain core on small data, without ZenML: each technique has its real effect."""

import numpy as np
import pytest
from torch import nn

from edgeopt.artifacts import model_or_failure
from edgeopt.config import TargetConfig
from edgeopt.measure.evaluate import evaluate_variants
from edgeopt.models.export import ParityError, check_parity, export_checkpoint
from edgeopt.models.zoo import count_macs_params, load_checkpoint
from edgeopt.shrink.prune import PruneOptions, prune_channels
from edgeopt.shrink.run import shrink_base
from edgeopt.train.fit import accuracy, kd_loss

pytestmark = pytest.mark.slow  # trains, prunes and exports models (docs/tests.md: the inner loop skips them)


def test_data_split_is_stratified_seeded_and_hashed(digits, tiny_config):
    from edgeopt.data.sources import load_dataset

    sizes = digits.manifest["sizes"]
    assert sum(sizes.values()) == 1797 and sizes["test"] == 450
    y_all = np.concatenate([digits.split(s)[1] for s in ("train", "val", "test")])
    frac = np.bincount(digits.split("test")[1]) / np.bincount(y_all)
    assert np.all(np.abs(frac - 0.25) < 0.01)  # stratified: every class split 25 % to test
    again = load_dataset(tiny_config.data, seed=0)
    assert again.content_hash == digits.content_hash  # byte-identical re-load: the cache stays valid
    assert load_dataset(tiny_config.data, seed=1).content_hash != digits.content_hash


def test_kd_loss_is_zero_gradient_free_only_when_student_matches_teacher():
    import torch

    logits = torch.randn(8, 10)
    labels = logits.argmax(1)
    same = kd_loss(logits, logits, labels, temperature=4.0, alpha=1.0)
    other = kd_loss(torch.zeros(8, 10), logits, labels, temperature=4.0, alpha=1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6) and float(other) > 0.1


def test_teacher_and_student_learn(digits, teacher_ckpt, student_ckpt):
    x, y = digits.split("test")
    assert accuracy(load_checkpoint(teacher_ckpt), x, y) > 0.85
    assert accuracy(load_checkpoint(student_ckpt), x, y) > 0.80
    assert student_ckpt.manifest["params"] < teacher_ckpt.manifest["params"] / 5
    assert student_ckpt.manifest["lineage"]["teacher"] == teacher_ckpt.content_hash[:12]


def test_structured_pruning_removes_channels_and_macs(digits, teacher_ckpt, student_ckpt):
    pruned = shrink_base(student_ckpt, teacher_ckpt, digits, "prune", 0.5,
                         PruneOptions(amounts=[0.5], finetune_epochs=2, lr=0.02, round_to=None), seed=0)
    before, after = load_checkpoint(student_ckpt), load_checkpoint(pruned)
    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert sum(convs(after)) <= 0.55 * sum(convs(before))
    assert pruned.manifest["macs"] < 0.5 * student_ckpt.manifest["macs"]
    assert pruned.manifest["params"] < 0.5 * student_ckpt.manifest["params"]
    x, y = digits.split("test")
    assert accuracy(after, x, y) > 0.7  # the KD fine-tune recovered a working model


def test_prune_ratio_is_validated(student_ckpt):
    with pytest.raises(ValueError, match="prune ratio"):
        prune_channels(load_checkpoint(student_ckpt), [1, 8, 8], 10, 1.2)


def test_export_parity(digits, student_ckpt):
    onnx_fp32 = export_checkpoint(student_ckpt, "onnx", digits, "student-fp32-onnx")
    ir_fp32 = export_checkpoint(student_ckpt, "openvino", digits, "student-fp32-openvino")
    assert not onnx_fp32.failed and not ir_fp32.failed
    assert onnx_fp32.manifest["parity_max_abs_diff"] < 1e-3 and ir_fp32.manifest["parity_max_abs_diff"] < 1e-3


def test_parity_check_catches_a_wrong_export(digits, student_ckpt):
    model = load_checkpoint(student_ckpt)
    with pytest.raises(ParityError):
        check_parity(model, lambda x: np.zeros((len(x), 10), np.float32), digits.split("val")[0][:8])


def test_failed_variant_is_recorded_and_skipped(digits, teacher_ckpt, student_ckpt):
    def boom():
        raise RuntimeError("converter exploded")

    failed = model_or_failure(boom, variant="student-int8-onnx", fmt="onnx",
                              recipe={"scheme": "int8", "format": "onnx"}, lineage={})
    assert failed.failed and "converter exploded" in failed.manifest["reason"]
    teacher_onnx = export_checkpoint(teacher_ckpt, "onnx", digits, "teacher-fp32-onnx")
    good = export_checkpoint(student_ckpt, "onnx", digits, "student-fp32-onnx")
    ev = evaluate_variants([teacher_onnx, good, failed], {m.variant: ["onnxruntime"] for m in (teacher_onnx, good, failed)},
                           digits, "teacher-fp32-onnx@onnxruntime", TargetConfig(warmup=2, iterations=20))
    status = {r.variant: r.status for r in ev.results}
    assert status == {"teacher-fp32-onnx@onnxruntime": "ok", "student-fp32-onnx@onnxruntime": "ok",
                      "student-int8-onnx@onnxruntime": "failed"}
    ok = ev.result("student-fp32-onnx@onnxruntime").metrics
    assert ok["latency_p50_ms"] <= ok["latency_p95_ms"] <= ok["latency_p99_ms"]
    assert ok["compression_ratio"] > 5 and ok["speedup_vs_reference"] > 1 and ok["latency_noise_pct"] >= 0
    assert ev.reference.variant == "teacher-fp32-onnx@onnxruntime"
    assert ev.fingerprint["cores"] >= 1 and ev.fingerprint["id"]


def test_macs_counter_matches_a_hand_count():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False))
    macs, params = count_macs_params(conv, [1, 8, 8])
    assert params == 36 and macs == 36 * 64
