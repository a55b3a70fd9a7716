"""Chosen on validation, reported on test: selection, its constraints and the promotion rule read the
validation accuracy, the test accuracy is reported beside it; a validation split missing from the
data is carved from train, never from test; training, KD fine-tunes and calibration never read a
test image."""

import math

import numpy as np
import pytest
from PIL import Image

from edgeopt.artifacts import Dataset
from edgeopt.config import DataConfig, PromotionConfig, QuantConfig
from edgeopt.data.sources import load_dataset
from edgeopt.measure.evaluate import (
    Evaluation,
    Reference,
    VariantResult,
    accuracy_inputs,
    accuracy_labels,
    split_accuracies,
)
from edgeopt.models.export import export_checkpoint
from edgeopt.precisions import quantize_model
from edgeopt.select.pareto import select
from edgeopt.select.promotion import decide
from edgeopt.select.report import SPLITS_NOTE, pareto_plot, selection_report, variants_table
from edgeopt.shrink.prune import PruneOptions
from edgeopt.shrink.run import shrink_base
from edgeopt.train.fit import distill_student
from edgeopt.train.teacher import train_teacher
from tests.test_data import _presplit

# ---------------------------------------------------------------- where the validation split comes from


def _rows(ds: Dataset, split: str) -> set:
    return {r.tobytes() for r in ds.raw(split)}


def test_a_presplit_tree_without_val_carves_it_from_train_seeded_never_from_test(tmp_path):
    root = _presplit(tmp_path / "tree", with_val=False)
    cfg = DataConfig(source="imagefolder", root=root, split={"val": 0.25, "test": 0.25})
    a, again, other = (load_dataset(cfg, seed=s, cache_dir=tmp_path / "cache") for s in (0, 0, 1))
    folder = {s: {np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1).tobytes()
                  for p in sorted((root / s).rglob("*.png"))} for s in ("train", "test")}
    assert len(folder["train"]) == 24 and len(folder["test"]) == 9  # every image distinct
    for ds in (a, other):
        assert _rows(ds, "test") == folder["test"] and ds.size("test") == 9  # test/ as given, whole
        assert _rows(ds, "train") | _rows(ds, "val") == folder["train"]  # val carved out of train/...
        assert not _rows(ds, "train") & _rows(ds, "val") and ds.size("train") + ds.size("val") == 24  # ...disjoint
        assert np.bincount(ds.labels("val")).tolist() == [2, 2, 2]  # stratified
    assert np.array_equal(a.raw("val"), again.raw("val"))  # seeded: the same seed, the same split
    assert _rows(a, "val") != _rows(other, "val")  # and it is the seed that draws it


def test_a_random_split_draws_test_before_val():
    """Changing the validation fraction moves images between train and val only: the test split stays."""
    small, large = (load_dataset(DataConfig(source="digits", split={"val": val, "test": 0.25}), seed=0)
                    for val in (0.1, 0.3))
    assert np.array_equal(small.raw("test"), large.raw("test")) and small.size("val") < large.size("val")
    assert not _rows(large, "val") & _rows(large, "test")


# ---------------------------------------------------------------- no test image in training or calibration

READS = ("size", "labels", "raw", "batches", "sample", "split")  # every Dataset method that takes a split


@pytest.fixture
def test_split_gone(digits, tmp_path, monkeypatch):
    """The digits without their test split's files (a read of them by any route fails), and every split
    that a Dataset method is asked for, recorded."""
    ds = digits.copy_to(tmp_path / "digits")
    for name in ("images_test.npy", "y_test.npy"):
        (ds.path / name).unlink()
    asked = []
    for method in READS:
        def recorded(self, *args, _method=getattr(Dataset, method), **kwargs):
            asked.append(args[0] if args else kwargs.get("split", kwargs.get("name")))
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(Dataset, method, recorded)
    return ds, asked


@pytest.mark.slow  # trains, prunes, fine-tunes, exports and quantizes (a few steps each)
def test_training_fine_tunes_and_calibration_never_read_the_test_split(test_split_gone, tiny_config):
    ds, asked = test_split_gone
    # small_cnn: the architecture whose ONNX export NNCF's accuracy control takes (tests/test_precisions.py)
    teacher = train_teacher(ds, tiny_config.teacher.model_copy(update={"arch": "small_cnn", "steps": 4, "eval_every": 2}),
                            seed=0)
    distill_student(ds, teacher, tiny_config.student.model_copy(update={"steps": 4}), seed=0)
    pruned = shrink_base(teacher, teacher, ds, "prune", 0.5,
                         PruneOptions(amounts=[0.5], finetune_steps=2, round_to=None), seed=0)
    assert pruned.manifest["val_accuracy"] is not None and pruned.manifest["macs"] < teacher.manifest["macs"]
    qcfg = QuantConfig(calibration_samples=32, accuracy_control={"max_drop": 5.0, "max_iterations": 2})
    built = []
    for fmt in ("onnx", "openvino"):
        fp32 = export_checkpoint(teacher, fmt, ds, f"teacher-fp32-{fmt}")  # the student of 4 steps did not learn
        built += [fp32, *(quantize_model(fp32, p, ds, qcfg, 0, f"teacher-{p}-{fmt}") for p in ("int8", "int8-acc"))]
    assert [b.manifest.get("reason") for b in built if b.failed] == []  # a read of test would have failed them
    assert "test" not in asked and {"train", "val"} <= set(asked), sorted(set(asked))


# ---------------------------------------------------------------- selection reads validation, reports test

REF = {"accuracy": 0.95, "test_accuracy": 0.95}


def _result(name: str, val: float, test: float, p50: float, size: float) -> VariantResult:
    return VariantResult(variant=name, status="ok", recipe={"runtime": "onnxruntime"}, metrics={
        "accuracy": val, "test_accuracy": test, "accuracy_drop": 100 * (REF["accuracy"] - val),
        "test_accuracy_drop": 100 * (REF["test_accuracy"] - test), "latency_p50_ms": p50, "latency_p95_ms": 1.1 * p50,
        "latency_noise_pct": 1.0, "size_mb": size, "compression_ratio": 1 / size, "speedup_vs_reference": 1 / p50,
    })


@pytest.fixture
def disagreeing() -> Evaluation:
    """Validation and test disagree: 'best-on-test' is the fastest and most accurate on test, but drops 3
    points on validation; 'behind-on-val' beats 'best-on-val' on test yet trails it on validation."""
    return Evaluation(
        target={"name": "cpu", "threads": 1, "batch": 1, "iterations": 30, "warmup": 5},
        fingerprint={"id": "f", "cpu": "cpu", "cores": 2, "isa": []},
        reference=Reference(variant="ref", accuracy=REF["accuracy"], test_accuracy=REF["test_accuracy"],
                            latency_p50_ms=1.0, latency_p95_ms=1.1, size_mb=1.0, params=1.0),
        results=[_result("ref", 0.95, 0.95, 1.0, 1.0), _result("best-on-val", 0.945, 0.90, 0.30, 0.30),
                 _result("best-on-test", 0.92, 0.97, 0.20, 0.25), _result("behind-on-val", 0.942, 0.96, 0.35, 0.35)],
    )


def test_selection_is_decided_on_validation(disagreeing):
    ev, constraints = disagreeing, {"max_accuracy_drop": 1.0}
    sel = select(ev.metrics_by_variant(), constraints, "latency")
    verdicts = {v.variant: v for v in sel.verdicts}
    assert sel.winner == "best-on-val"
    assert verdicts["best-on-test"].status == "infeasible"
    assert verdicts["best-on-test"].reasons == ["val accuracy drop 3.00 pt > 1.0 pt"]
    assert verdicts["behind-on-val"].status == "dominated" and "best-on-val" in verdicts["behind-on-val"].reasons[0]
    # the same figures read on test would choose otherwise: the case tells the splits apart
    on_test = {n: {**m, "accuracy": m["test_accuracy"], "accuracy_drop": m["test_accuracy_drop"]}
               for n, m in ev.metrics_by_variant().items() if m is not None}
    assert select(on_test, constraints, "latency").winner == "best-on-test"
    assert select(ev.metrics_by_variant(), {}, "accuracy").winner == "ref"  # test: best-on-test (0.97)
    assert select(on_test, {}, "accuracy").winner == "best-on-test"


def test_promotion_is_decided_on_validation():
    rule = PromotionConfig(max_accuracy_loss=0.5, min_latency_gain_pct=5.0)
    champion = _result("champion-v1:x", 0.95, 0.95, 1.0, 1.0)
    worse_on_test = decide(_result("a", 0.95, 0.80, 0.5, 1.0), champion, rule)  # 15 pt lower on test only
    assert worse_on_test.promote
    assert worse_on_test.checks[0] == ("pass: val accuracy 95.00% vs champion 95.00% (loss 0.00 pt, allowed 0.5; "
                                       "test 80.00% vs 95.00%, reported, not decided on)")
    worse_on_val = decide(_result("b", 0.94, 0.99, 0.5, 1.0), champion, rule)  # 1 pt lower on val, 4 higher on test
    assert not worse_on_val.promote and "on accuracy" in worse_on_val.reason
    assert worse_on_val.checks[0].startswith("FAIL: val accuracy 94.00% vs champion 95.00% (loss 1.00 pt")
    assert worse_on_val.rule.startswith("val accuracy loss vs champion <= 0.5 pt")


def test_the_table_and_the_report_carry_both_splits(disagreeing, tmp_path):
    ev = disagreeing.model_copy(update={"champion": _result("champion-v1:x", 0.93, 0.94, 0.5, 0.5)})
    sel = select(ev.metrics_by_variant(), {"max_accuracy_drop": 1.0}, "latency")
    decision = decide(ev.result(sel.winner), ev.champion, PromotionConfig())
    table = variants_table(ev, sel)
    lines = table.splitlines()
    rows = {ln[2:].split()[0]: (ln[0], *ln[2:].split()[1:4]) for ln in lines[2:6]}
    assert lines[0].split()[:6] == ["variant", "val", "%", "test", "%", "drop"]
    assert rows["best-on-val"] == ("*", "94.50", "90.00", "0.50")  # val %, test %, the drop on val
    assert rows["best-on-test"] == (" ", "92.00", "97.00", "3.00") and rows["ref"][0] == "="
    assert "reference ref (FP32, same run): val acc 95.00 %, test acc 95.00 %" in table
    assert "champion champion-v1:x: val acc 93.00 %, test acc 94.00 %" in table
    report = selection_report(ev, sel, decision, "run-1")
    assert SPLITS_NOTE == "chosen on the validation split; test figures reported, never used to choose"
    assert f"**Splits:** {SPLITS_NOTE}" in report and table in report
    assert ("**Winner's accuracy:** test 90.00 % (drop 5.00 pt vs the reference's 95.00 %); validation 94.50 % "
            f"(drop 0.50 pt), {SPLITS_NOTE}.") in report
    assert pareto_plot(ev, sel, tmp_path / "pareto.png").stat().st_size > 0


# ---------------------------------------------------------------- one accuracy stream: val, then test


def test_the_accuracy_stream_is_val_then_test_and_its_predictions_split_back(digits):
    stream = np.concatenate(list(accuracy_inputs(digits)))
    assert np.array_equal(stream, np.concatenate([digits.split("val")[0], digits.split("test")[0]]))
    labels = accuracy_labels(digits)
    assert list(labels) == ["val", "test"] and np.array_equal(labels["test"], digits.labels("test"))
    right_on_val = np.concatenate([labels["val"], (labels["test"] + 1) % 10])
    assert split_accuracies(right_on_val, labels) == {"accuracy": 1.0, "test_accuracy": 0.0}
    every_other = labels["val"].copy()
    every_other[::2] = -1
    got = split_accuracies(np.concatenate([every_other, labels["test"]]), labels)
    n = len(labels["val"])
    assert math.isclose(got["accuracy"], (n // 2) / n) and got["test_accuracy"] == 1.0
