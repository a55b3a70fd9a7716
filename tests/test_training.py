"""The training loop: augmentation chosen from the data, function-matching KD, the warm-up + cosine
schedule, early stop with the best weights kept, BatchNorm recalibration, "did not learn", and a
student started from a local pretrained state dict."""

import copy
import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from edgeopt.config import AugmentConfig, ConfigError, DataConfig, FitConfig, StudentConfig
from edgeopt.data.sources import load_dataset
from edgeopt.models.brought import PretrainedError, onnx_teacher
from edgeopt.models.zoo import build_model, load_checkpoint, save_checkpoint
from edgeopt.plan import parse_config
from edgeopt.train.fit import (
    Augmenter,
    chance_level,
    distill_student,
    fit,
    load_matching_weights,
    recalibrate_bn,
    resolve_augment,
    resolve_device,
    split_accuracy,
    warmup_cosine,
)
from examples.make_shapes import make_shapes
from tests._tiny import TINY

pytestmark = pytest.mark.slow  # trains models (docs/tests.md: the inner loop skips them)


def _imagefolder(tmp_path_factory, name, per_class, size, grayscale=False):
    root = make_shapes(tmp_path_factory.mktemp(name), per_class=per_class, size=size)
    return load_dataset(DataConfig(source="imagefolder", root=root, grayscale=grayscale), seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """RGB 32x32 shapes, 60 a class: enough for a MobileNetV3 to learn in a few dozen steps."""
    return _imagefolder(tmp_path_factory, "shapes", per_class=60, size=32)


def _random_teacher(dataset, seed=1):
    torch.manual_seed(seed)
    arch = {"name": "small_cnn", "num_classes": len(dataset.classes), "in_channels": dataset.input_shape[0],
            "width": 4}
    model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], arch["width"])
    return save_checkpoint(model, role="teacher", arch=arch, input_shape=dataset.input_shape, info={"tag": "teacher"})


@torch.no_grad()
def _train_mode_accuracy(model, dataset, split, batch_size=32):
    """Accuracy with BatchNorm normalizing each batch by its own statistics (what training sees)."""
    twin = copy.deepcopy(model).train()
    hits = sum(int((twin(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
               for x, y in dataset.batches(split, batch_size))
    return hits / dataset.size(split)


def test_augmentation_is_chosen_from_the_data(digits, shapes, tmp_path_factory):
    assert resolve_augment("auto", digits) == AugmentConfig(shift_px=1.0)  # no crop, flip or colour for digits
    assert resolve_augment("auto", shapes) == AugmentConfig(random_resized_crop=0.5, hflip=True)
    tiny = _imagefolder(tmp_path_factory, "tiny", per_class=8, size=16)
    assert resolve_augment("auto", tiny) == AugmentConfig(shift_px=1.0)
    gray = _imagefolder(tmp_path_factory, "gray", per_class=8, size=32, grayscale=True)
    assert resolve_augment("auto", gray) == AugmentConfig(random_resized_crop=0.5)  # no mirror: text, scans
    mine = AugmentConfig(hflip=True)
    assert resolve_augment(mine, digits) is mine  # what the config says wins over the data

    raw, _ = next(shapes.batches("train", 16, normalized=False))
    torch.manual_seed(0)
    assert np.array_equal(Augmenter(AugmentConfig(), shapes)(raw).numpy(), shapes.normalize(raw))
    views = Augmenter(resolve_augment("auto", shapes), shapes)(raw).numpy()
    assert views.shape == (16, 3, 32, 32) and views.dtype == np.float32
    assert all(not np.allclose(v, x, atol=1e-3) for v, x in zip(views, shapes.normalize(raw)))
    image = shapes.normalize(raw[:1])[0]
    views = Augmenter(AugmentConfig(hflip=True), shapes)(np.repeat(raw[:1], 64, axis=0)).numpy()
    mirrored = sum(np.array_equal(v, image[:, :, ::-1]) for v in views)
    assert 10 < mirrored < 54 and mirrored + sum(np.array_equal(v, image) for v in views) == 64


class RecordingTeacher(nn.Module):
    """A teacher that keeps every batch it is shown and answers one image at a time (as an ONNX
    model exported with a fixed batch of 1 does), with logits of a fixed random projection."""

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.proj = nn.Linear(in_features, num_classes)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.cat([self.proj(image.reshape(1, -1)) for image in x])


def test_the_teacher_sees_the_students_augmented_views(shapes):
    teacher = RecordingTeacher(3 * 32 * 32, 3)
    student = build_model("small_cnn", 3, 3, 4)
    trained_on = []
    student.register_forward_pre_hook(
        lambda module, args: trained_on.append(args[0].clone()) if torch.is_grad_enabled() else None)
    fit(student, shapes, FitConfig(steps=4, batch_size=8), teacher=teacher, seed=0)
    assert len(trained_on) == len(teacher.seen) == 4
    assert all(torch.equal(s, t) for s, t in zip(trained_on, teacher.seen))
    originals = torch.from_numpy(shapes.split("train")[0]).flatten(1)
    nearest = torch.cdist(torch.cat(teacher.seen).flatten(1), originals).min(dim=1).values
    assert (nearest > 1e-3).all()  # augmented views (auto: crop and flip), not the stored images


def test_a_teacher_that_outputs_probabilities_teaches_like_its_logits(digits):
    torch.manual_seed(3)
    logits_teacher = build_model("small_cnn", 10, 1, 4).eval()
    probs_teacher = nn.Sequential(copy.deepcopy(logits_teacher), nn.Softmax(dim=1)).eval()
    cfg = FitConfig(steps=6, batch_size=32, eval_every=3, lr=0.05)
    students = []
    for teacher, output in ((logits_teacher, "logits"), (probs_teacher, "probabilities")):
        torch.manual_seed(0)
        students.append(build_model("small_cnn", 10, 1, 4))
        fit(students[-1], digits, cfg, teacher=teacher, teacher_output=output, seed=0)
    a, b = (s.state_dict() for s in students)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    torch.manual_seed(0)
    naive = build_model("small_cnn", 10, 1, 4)  # the probabilities taken for logits: another student
    fit(naive, digits, cfg, teacher=probs_teacher, seed=0)
    assert not torch.allclose(naive.state_dict()["5.weight"], a["5.weight"], atol=1e-3)


def test_a_brought_onnx_teacher_with_a_fixed_batch_of_1_and_probabilities_distills(digits, teacher_ckpt, tmp_path):
    softmax_model = nn.Sequential(load_checkpoint(teacher_ckpt), nn.Softmax(dim=1)).eval()
    path = tmp_path / "teacher_b1.onnx"
    torch.onnx.export(softmax_model, (torch.zeros(1, *digits.input_shape),), str(path), dynamo=True,
                      input_names=["pixels"], output_names=["probs"]).save(str(path))
    brought = onnx_teacher(path, digits)
    assert brought.manifest["output"] == "probabilities" and brought.manifest["onnx"]["fixed_batch"] == 1
    cfg = StudentConfig(arch="small_cnn", width=8, steps=60, eval_every=20, lr=0.05)
    student = distill_student(digits, brought, cfg, seed=0)
    assert student.manifest["learned"] and student.manifest["val_accuracy"] > 0.8


def test_learning_rate_warms_up_linearly_then_decays_on_a_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = warmup_cosine(opt, steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([0.01 * (k + 1) for k in range(10)])
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) in (9, 10)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises again
    assert lrs[55] == pytest.approx(0.05)  # half way down the cosine
    assert 0 < lrs[-1] < 1e-3


def test_steps_set_the_run_length_and_early_stop_keeps_the_best_weights(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 4)
    hist = fit(model, digits, FitConfig(steps=30, batch_size=32, eval_every=7, lr=0.05), seed=0)
    assert hist["steps"] == 30 and hist["step"] == [7, 14, 21, 28, 30] and not hist["stopped_early"]
    assert len(hist["loss"]) == len(hist["val_acc"]) == 5
    assert split_accuracy(model, digits, "val") == hist["best_val_acc"] == max(hist["val_acc"])

    torch.manual_seed(0)
    frozen = build_model("small_cnn", 10, 1, 4)  # a learning rate too small to change any prediction
    hist = fit(frozen, digits, FitConfig(steps=500, batch_size=32, eval_every=5, lr=1e-9, patience=3), seed=0)
    assert hist["stopped_early"] and hist["steps"] == 20 and hist["step"] == [5, 10, 15, 20]
    assert hist["best_step"] == 20  # a tie goes to the later weights


def test_a_caller_sees_every_evaluation_and_stops_the_run_on_the_whole_runs_schedule(digits):
    """What a search's successive halving needs: evaluations at its rungs' steps, reported as they come, and a
    stop there that leaves the run as the first steps of the longer one (a cosine sized for all 16 steps)."""
    def run(stop_at):
        torch.manual_seed(0)
        model, seen = build_model("small_cnn", 10, 1, 4), []
        hist = fit(model, digits, FitConfig(steps=16, batch_size=32, eval_every=8, lr=0.05), seed=0, eval_at=(3, 6),
                   on_eval=lambda step, acc: seen.append((step, acc)) or step == stop_at)
        assert seen == list(zip(hist["step"], hist["val_acc"]))
        return hist

    stopped, whole = run(6), run(None)
    assert stopped["step"] == [3, 6] and stopped["steps"] == 6 and stopped["stopped_by"] == "on_eval"
    seen: list = []  # with start_counts the start is an evaluation at step 0 (a rung's best so far counts it)
    start = fit(build_model("small_cnn", 10, 1, 4), digits, FitConfig(steps=4, batch_size=32, lr=0.05), seed=0,
                on_eval=lambda step, acc: seen.append((step, acc)) or step == 0, start_counts=True)
    assert seen[0] == (0, start["start_val_acc"]) and start["steps"] == 4  # and no stop there
    assert stopped["stopped_early"] and stopped["best_val_acc"] == max(stopped["val_acc"])
    assert whole["step"] == [3, 6, 8, 16] and whole["steps"] == 16 and whole["stopped_by"] is None
    assert whole["val_acc"][:2] == stopped["val_acc"] and whole["loss"][:2] == stopped["loss"]


def test_training_runs_on_cuda_when_torch_sees_one_else_on_the_cpu(digits, monkeypatch):
    has_cuda = torch.cuda.is_available()
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if has_cuda else "cpu")
    if not has_cuda:
        with pytest.raises(ValueError, match="device: cuda asked for, but torch sees no CUDA device"):
            resolve_device("cuda")
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 4)
    hist = fit(model, digits, FitConfig(steps=5, batch_size=32), seed=0)
    assert hist["device"] == ("cuda" if has_cuda else "cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())  # saved and exported from the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda" and resolve_device("cpu").type == "cpu"


def test_batchnorm_recalibration_makes_eval_mode_follow_train_mode(shapes):
    """MobileNetV3's BatchNorm (momentum 0.01) still holds near-initial statistics after 40 steps:
    in eval mode it answers at chance while the same weights, normalized by batch statistics, are
    right. Recalibration brings eval mode to train mode, and ``fit`` recalibrates before it evaluates."""
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3, 3, 0)
    cfg = FitConfig(steps=40, batch_size=32, lr=0.05, augment={}, eval_every=40)
    fit(model, shapes, cfg.model_copy(update={"bn_recalibration_batches": 0}), seed=0)
    stale_state = copy.deepcopy(model.state_dict())
    stale = split_accuracy(model, shapes, "train")
    train_mode = _train_mode_accuracy(model, shapes, "train")
    assert train_mode > 0.8 and stale < 0.5
    recalibrate_bn(model, shapes.batches("train", 32, shuffle=True, limit=320))
    assert not model.training
    recalibrated = split_accuracy(model, shapes, "train")
    assert abs(recalibrated - train_mode) <= 0.08 and recalibrated > stale + 0.3
    assert all(m.momentum == 0.01 for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    model.load_state_dict(stale_state)  # the same stale model, through one fit step that cannot change it
    hist = fit(model, shapes, cfg.model_copy(update={"steps": 1, "lr": 1e-9}), seed=0)
    assert hist["best_val_acc"] == split_accuracy(model, shapes, "val") > 0.6


def test_chance_level_rule():
    balanced = np.repeat(np.arange(3), 30)
    chance, floor = chance_level(balanced)
    assert chance == pytest.approx(1 / 3)
    assert floor == pytest.approx(1 / 3 + 3 * math.sqrt((1 / 3) * (2 / 3) / 90))  # 3 std errors > 10 points
    chance, floor = chance_level(np.repeat(np.arange(10), 100))
    assert floor == pytest.approx(0.2)  # 10 points > 3 std errors on 1000 images
    chance, floor = chance_level(np.array([0] * 95 + [1] * 5))
    assert chance == 0.95 and floor == pytest.approx(0.975)  # capped half way to 100 %


def test_a_student_that_does_not_learn_is_reported_not_raised(digits, caplog):
    cfg = StudentConfig(arch="small_cnn", width=4, steps=20, eval_every=5, lr=1e-7)
    with caplog.at_level(logging.WARNING, logger="edgeopt.train.fit"):
        ckpt = distill_student(digits, _random_teacher(digits), cfg, seed=0)
    m = ckpt.manifest
    assert m["learned"] is False and m["val_accuracy"] == m["history"]["best_val_acc"] < 0.3
    assert m["history"]["step"] == [5, 10, 15, 20] and len(m["history"]["val_acc"]) == 4
    assert "distill_student: small_cnn did not learn (val acc " in caplog.text and "chance 10.4 %)" in caplog.text


def test_student_starts_from_a_pretrained_state_dict_with_another_head(tmp_path, digits):
    torch.manual_seed(0)
    imagenet = build_model("mobilenet_v3_small", 1000, 3, 0)
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pth")
    ours = build_model("mobilenet_v3_small", 3, 3, 0)
    report = load_matching_weights(ours, tmp_path / "imagenet.pth")
    assert report["kept_initial"] == report["unused"] == ["classifier.3.bias", "classifier.3.weight"]
    assert report["loaded"] == len(ours.state_dict()) - 2 and len(report["sha256"]) == 64
    assert torch.equal(ours.features[0][0].weight, imagenet.features[0][0].weight)
    assert ours.classifier[3].weight.shape == (3, 1024)

    save_file(build_model("resnet18", 1000, 3, 0).state_dict(), str(tmp_path / "resnet18.safetensors"))
    with pytest.raises(PretrainedError, match=r"resnet18.safetensors: only 0 of the model's \d+ tensors match"):
        load_matching_weights(build_model("mobilenet_v3_small", 3, 3, 0), tmp_path / "resnet18.safetensors")

    torch.manual_seed(0)
    torch.save(build_model("small_cnn", 5, 1, 4).state_dict(), tmp_path / "small.pt")  # 5 classes, digits has 10
    cfg = StudentConfig(arch="small_cnn", width=4, steps=2, checkpoint=tmp_path / "small.pt")
    ckpt = distill_student(digits, _random_teacher(digits), cfg, seed=0)
    assert ckpt.manifest["pretrained"]["kept_initial"] == ["5.bias", "5.weight"]
    assert ckpt.manifest["pretrained"]["loaded"] == len(build_model("small_cnn", 10, 1, 4).state_dict()) - 2


def test_student_options_are_validated_up_front(tmp_path):
    raw = {**TINY, "student": {**TINY["student"], "checkpoint": str(tmp_path / "missing.pt")}}
    with pytest.raises(ConfigError, match="student.checkpoint: file not found"):
        parse_config(raw, "cfg")
    raw = {**TINY, "student": {**TINY["student"], "augment": {"hflip": True, "mixup": 0.2}}}
    with pytest.raises(ConfigError, match="student.augment"):
        parse_config(raw, "cfg")
    cfg = parse_config({**TINY, "student": {**TINY["student"], "augment": {"random_resized_crop": 0.5}}}, "cfg")
    assert cfg.student.augment == AugmentConfig(random_resized_crop=0.5) and cfg.student.steps is None
