"""Every structural technique on small data, each asserting its real effect on the model (precision
recipes: tests/test_precisions.py)."""

import copy

import pytest
import torch
from torch import nn

from edgeopt.models.export import export_checkpoint
from edgeopt.models.zoo import apply_lowrank_plan, count_macs_params, load_checkpoint
from edgeopt.shrink.base import output_layers
from edgeopt.shrink.lowrank import LowRankOptions, energy_rank, factorize_lowrank
from edgeopt.shrink.prune import IMPORTANCES, Prune, PruneOptions, prune_channels
from edgeopt.shrink.reconstruct import reconstruct, refittable
from edgeopt.shrink.run import shrink_base
from edgeopt.shrink.sparsity import SparsityOptions, sparsify
from edgeopt.train.features import feature_loss, layer_outputs, shape_kept_layers
from edgeopt.train.fit import accuracy

pytestmark = pytest.mark.slow  # trains and fine-tunes models (docs/tests.md: the inner loop skips them)

SHAPE, CLASSES = [1, 8, 8], 10


def conv_channels(model):
    return [c.out_channels for c in model.modules() if isinstance(c, nn.Conv2d)]


# ---------------------------------------------------------------- structured pruning


@pytest.mark.parametrize("importance", [i for i in IMPORTANCES if i != "taylor"])
def test_every_importance_halves_each_layer_locally_and_ranks_globally(student_ckpt, importance):
    torch.manual_seed(0)  # "random" importance draws from torch's generator
    local = load_checkpoint(student_ckpt)
    prune_channels(local, SHAPE, CLASSES, 0.5, importance)
    assert conv_channels(local) == [c // 2 for c in conv_channels(load_checkpoint(student_ckpt))]
    skewed = load_checkpoint(student_ckpt)
    with torch.no_grad():  # all but 2 of the first block's channels made negligible, whatever training left
        for kind in (nn.Conv2d, nn.BatchNorm2d):
            next(m for m in skewed.modules() if isinstance(m, kind)).weight[2:].mul_(0.001)
    prune_channels(skewed, SHAPE, CLASSES, 0.5, importance, global_pruning=True)
    assert conv_channels(skewed) != conv_channels(local)  # one ranking across layers: uneven widths
    assert abs(sum(conv_channels(skewed)) - sum(conv_channels(local))) <= 2
    steps = load_checkpoint(student_ckpt)
    prune_channels(steps, SHAPE, CLASSES, 0.5, importance, iterative_steps=3)
    assert conv_channels(steps) == conv_channels(local)  # the ratio is reached over the steps


def test_round_to_keeps_whole_blocks_of_channels():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 40, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(40, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, CLASSES)).eval()

    exact, rounded = net(), net()
    prune_channels(exact, SHAPE, CLASSES, 0.2, "l2")
    assert conv_channels(exact) == [19, 32, 6]
    # rounded down to a multiple of 8; the 8-channel layer would be emptied, so it stays whole
    prune_channels(rounded, SHAPE, CLASSES, 0.2, "l2", round_to=8)
    assert conv_channels(rounded) == [16, 32, 8]
    assert PruneOptions(amounts=[0.2]).round_to == 8
    assert "channels in multiples of 8" in Prune().recipe(0.2, PruneOptions(amounts=[0.2]))


class InvertedResiduals(nn.Module):
    """A stem writing a 16-channel residual stream and two inverted-residual blocks adding to it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(16, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),
            nn.Conv2d(64, 16, 1)) for _ in range(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_keep_residual_prunes_only_the_channels_one_layer_owns():
    torch.manual_seed(0)
    reference = InvertedResiduals().eval()
    streams = ["stem", "blocks.0.4", "blocks.1.4"]
    uniform = copy.deepcopy(reference)
    kept = prune_channels(uniform, (3, 16, 16), 5, 0.5, "l2")
    assert {n: len(kept[n]) for n in streams} == {n: 8 for n in streams}  # the stream loses half everywhere
    hidden = copy.deepcopy(reference)
    kept = prune_channels(hidden, (3, 16, 16), 5, 0.5, "l2", keep_residual=True)
    assert sorted(kept) == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]  # expand + depthwise only
    assert conv_channels(hidden) == [16, 32, 32, 16, 32, 32, 16]
    assert "residual streams kept whole" in Prune().recipe(0.5, PruneOptions(amounts=[0.5], keep_residual=True))
    # every block still writes all 16 stream channels, so the refit matches the reference's whole output
    images, held_out = torch.randn(256, 3, 16, 16), torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        before = float(((hidden(held_out) - reference(held_out)) ** 2).mean())
    assert reconstruct(hidden, reference, kept, images)["layers"] == 4  # the expansions and the projections
    with torch.no_grad():
        assert float(((hidden(held_out) - reference(held_out)) ** 2).mean()) < 0.05 * before


def test_feature_kd_matches_the_layers_pruning_kept_and_pulls_them_to_the_base(digits, teacher_ckpt):
    torch.manual_seed(0)
    reference = InvertedResiduals().eval()
    hidden, uniform = copy.deepcopy(reference), copy.deepcopy(reference)
    prune_channels(hidden, (3, 16, 16), 5, 0.5, "l2", keep_residual=True)
    prune_channels(uniform, (3, 16, 16), 5, 0.5, "l2")
    assert shape_kept_layers(hidden, reference, (3, 16, 16)) == ["stem", "blocks.0.4", "blocks.1.4"]
    assert shape_kept_layers(uniform, reference, (3, 16, 16)) == []  # the streams lost channels too

    def pruned(weight):
        opts = PruneOptions(amounts=[0.5], keep_residual=True, round_to=None, feature_kd=weight, finetune_epochs=1,
                            lr=0.02)
        return shrink_base(teacher_ckpt, teacher_ckpt, digits, "prune", 0.5, opts)

    plain, matched = pruned(0.0), pruned(5.0)
    base = load_checkpoint(teacher_ckpt)
    layers = shape_kept_layers(load_checkpoint(matched), base, SHAPE)
    assert len(layers) >= 6 and matched.manifest["feature_kd_layers"] == len(layers)  # stem, each block's output
    assert f"feature KD on {len(layers)} layers" in matched.manifest["recipe_text"]
    assert "feature_kd_layers" not in plain.manifest and "feature KD" not in plain.manifest["recipe_text"]
    images = torch.from_numpy(next(digits.batches("val", 256))[0])

    def feature_error(ckpt):
        with torch.no_grad():
            return float(feature_loss(*(layer_outputs(m, layers, images) for m in (load_checkpoint(ckpt), base))))

    assert feature_error(matched) < 0.7 * feature_error(plain)  # 0.51 on an AMD EPYC (AVX2)


def test_least_squares_refit_brings_a_pruned_model_back_to_its_reference():
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 48, 1), nn.BatchNorm2d(48),
        nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.ReLU(), nn.Conv2d(48, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    for steps in (1, 3):  # the kept channels compose over iterative steps
        pruned = copy.deepcopy(reference)
        kept = prune_channels(pruned, (3, 16, 16), 5, 0.4, "l2", iterative_steps=steps)
        assert {n: len(k) for n, k in kept.items() if n in ("0", "3", "8")} == {"0": 19, "3": 28, "8": 19}
        stem = pruned.get_submodule("0")  # its inputs (the image) are whole: its rows are the reference's kept rows
        assert torch.equal(stem.weight, reference.get_submodule("0").weight[kept["0"]])
    calibration, held_out = torch.randn(256, 3, 16, 16), torch.randn(64, 3, 16, 16)
    assert refittable(pruned) == ["3", "8", "12"]  # the 1x1 convolutions and the Linear layer

    def error(model):
        with torch.no_grad():
            return float(((model(held_out) - reference(held_out)) ** 2).mean())

    before = error(pruned)
    too_few = copy.deepcopy(pruned)  # 2 images: 512 pixel rows for each convolution, 2 rows for the Linear layer
    assert reconstruct(too_few, reference, kept, calibration[:2])["layers"] == 2
    summary = reconstruct(pruned, reference, kept, calibration)
    assert summary["layers"] == summary["of"] == 3 and summary["error_after"] < summary["error_before"]
    assert error(pruned) < 0.01 * before  # on images it was not refit on


def test_taylor_pruning_uses_gradients_then_kd_finetune_recovers(digits, teacher_ckpt, student_ckpt):
    with pytest.raises(ValueError, match="gradient_batches"):
        prune_channels(load_checkpoint(student_ckpt), SHAPE, CLASSES, 0.5, "taylor")
    # exact ratios: the tiny student's 8-channel layers would stay whole under the default round_to 8
    cfg = dict(importance="taylor", iterative_steps=2, lr=0.02, round_to=None)

    def pruned(epochs, reconstruct):
        opts = PruneOptions(amounts=[0.5], finetune_epochs=epochs, reconstruct=reconstruct, **cfg)
        return shrink_base(student_ckpt, teacher_ckpt, digits, "prune", 0.5, opts)

    raw, tuned, refit_raw = pruned(0, False), pruned(1, False), pruned(0, True)
    m = refit_raw.manifest
    assert m["tag"] == "p50" and m["shrink"] == {"technique": "prune", "amount": 0.5} and m["role"] == "pruned"
    assert m["base"] == "student" and "structured channel pruning 50%" in m["recipe_text"]
    assert m["importance"] == "taylor" and m["iterative_steps"] == 2 and "reconstruction" not in tuned.manifest
    assert tuned.manifest["finetune_epochs"] == 1
    assert PruneOptions(amounts=[0.5]).reconstruct is False
    refit = m["reconstruction"]  # the classifier refit on train images right after pruning
    assert refit["layers"] >= 1 and refit["error_after"] < refit["error_before"]
    assert m["macs"] < 0.5 * m["macs_before"] and m["params"] < 0.5 * m["params_before"]
    assert m["lineage"]["student"] == student_ckpt.content_hash[:12]
    x, y = digits.split("test")
    pruned_acc = accuracy(load_checkpoint(raw), x, y)
    assert accuracy(load_checkpoint(tuned), x, y) > pruned_acc + 0.05  # the KD fine-tune recovers
    assert accuracy(load_checkpoint(refit_raw), x, y) > pruned_acc + 0.05  # and so does the refit, with no step
    with pytest.raises(ValueError, match="unknown technique 'distill'"):
        shrink_base(student_ckpt, teacher_ckpt, digits, "distill", 0.5, PruneOptions(amounts=[0.5]))


# ---------------------------------------------------------------- low-rank factorization


def near_low_rank_net(rank: int = 4, seed: int = 0) -> nn.Module:
    """Layers whose weights are rank ``rank`` plus 1 % noise: the decaying spectrum of trained layers."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, CLASSES),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                out, cols = m.weight.shape[0], m.weight[0].numel()
                w = torch.randn(out, rank, generator=g) @ torch.randn(rank, cols, generator=g) / (rank * cols) ** 0.5
                m.weight.copy_((w + 0.01 * torch.randn(out, cols, generator=g) / cols**0.5).reshape(m.weight.shape))
    return net.eval()


def test_lowrank_keeps_the_energy_with_the_planned_ranks():
    assert [energy_rank(torch.tensor([3.0, 2.0, 1.0]), e) for e in (0.5, 0.9, 0.95)] == [1, 2, 3]
    net, x = near_low_rank_net(), torch.randn(16, 3, 8, 8)
    ref, params_before = net(x), sum(p.numel() for p in net.parameters())
    plan = factorize_lowrank(net, 0.99, min_params_saved=0.1, exclude=output_layers(net, CLASSES))
    assert plan == {"0": 4, "2": 4, "4": 4, "7": 4}  # the classifier "9" is never factorized
    for name, rank in plan.items():
        first, second = net.get_submodule(name)
        assert first.weight.shape[0] == rank and second.weight.shape[1] == rank and first.bias is None
    assert isinstance(net[4][0], nn.Conv2d) and net[4][0].stride == (2, 2) and net[4][1].kernel_size == (1, 1)
    assert sum(p.numel() for p in net.parameters()) < 0.4 * params_before
    with torch.no_grad():
        out = net(x)
        assert float((out - ref).abs().max() / ref.abs().max()) < 0.05  # before any fine-tune
        rebuilt = apply_lowrank_plan(near_low_rank_net(seed=1), plan)
        rebuilt.load_state_dict(net.state_dict(), strict=True)
        assert torch.equal(rebuilt(x), out)


def test_lowrank_skips_layers_that_would_not_shrink_and_rejects_bad_energy(student_ckpt):
    model = load_checkpoint(student_ckpt)
    assert factorize_lowrank(model, 0.99, 0.1, exclude=output_layers(model, CLASSES)) == {}  # full rank needed
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="energy"):
            factorize_lowrank(model, bad)


def test_lowrank_student_round_trips_through_its_checkpoint(digits, teacher_ckpt, student_ckpt):
    ckpt = shrink_base(student_ckpt, teacher_ckpt, digits, "lowrank", 0.9,
                       LowRankOptions(amounts=[0.9], finetune_epochs=1, lr=0.02, min_params_saved=0.05))
    m = ckpt.manifest
    assert m["tag"] == "lr90" and m["role"] == "lowrank" and m["lowrank_plan"] and "5" not in m["lowrank_plan"]
    model = load_checkpoint(ckpt)
    for name, rank in m["lowrank_plan"].items():
        first, second = model.get_submodule(name)
        assert first.weight.shape[0] == rank and second.weight.shape[1] == rank
    assert m["params"] < m["params_before"] and count_macs_params(model, SHAPE)[1] == m["params"]
    x, y = digits.split("test")
    assert accuracy(model, x, y) > 0.8
    onnx_art = export_checkpoint(ckpt, "onnx", digits, "student-lr90-fp32-onnx")  # exports with parity
    assert not onnx_art.failed and onnx_art.manifest["recipe"]["shrink"] == "lr90"


# ---------------------------------------------------------------- unstructured sparsity


def test_sparsity_survives_the_finetune_and_compresses(digits, teacher_ckpt, student_ckpt):
    ckpt = shrink_base(student_ckpt, teacher_ckpt, digits, "sparsity", 0.6,
                       SparsityOptions(amounts=[0.6], finetune_epochs=1, lr=0.02))
    model, report = load_checkpoint(ckpt), ckpt.manifest["sparsity"]
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    measured = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert measured == pytest.approx(0.6, abs=0.005) and report["overall"] == pytest.approx(measured)
    assert ckpt.manifest["tag"] == "sp60" and set(report["layers"]) == {"0.0", "1.0", "2.0", "5"}
    assert report["zlib_bytes_sparse"] < 0.8 * report["zlib_bytes_dense"] and report["zlib_saving"] > 0.2
    x, y = digits.split("test")
    assert accuracy(model, x, y) > 0.8
    with pytest.raises(ValueError, match="sparsity"):
        sparsify(load_checkpoint(student_ckpt), 1.0)


def test_per_layer_sparsity_hits_every_layer(student_ckpt):
    model = load_checkpoint(student_ckpt)
    params = sparsify(model, 0.5, global_pruning=False)
    assert len(params) >= 3  # every conv and linear layer of the small CNN
    for m, name in params:
        assert float((getattr(m, name) == 0).float().mean()) == pytest.approx(0.5, abs=0.06)
