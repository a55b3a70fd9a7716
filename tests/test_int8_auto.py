"""INT8 recipes chosen by measurement (``ignore_first: auto``): the decision on given figures, the
candidates, the recipe, and on the digits student the whole path (figures injected at the measuring
function's boundary, and measured for real), one calibration pass for all candidates, and no
measurement where the option is set."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeopt import precisions
from edgeopt.config import ConfigError, QuantConfig
from edgeopt.config.quant import NNCFOptions
from edgeopt.measure import latency
from edgeopt.measure.latency import Measured, cpu_info
from edgeopt.models.export import export_checkpoint
from edgeopt.plan import parse_config
from edgeopt.precisions import Inputs, int8, int8_choice, nncf_backend, quantize_model
from edgeopt.precisions.int8_choice import Figures, choose
from edgeopt.precisions.native import BF16_FLAGS
from edgeopt.runtimes import make_predictor
from edgeopt.runtimes.coverage import int8_coverage

slow = pytest.mark.slow  # trains, exports and quantizes models

# ---------------------------------------------------------------- the decision, on given figures


def test_the_fastest_within_the_budget_wins_even_with_a_float_layer():
    figs = {"all-int8": Figures(13.3, 0.948), "first-float": Figures(15.7, 0.950)}
    assert choose(0.950, figs, 0.5)[0] == "all-int8"  # 0.2 points: within, and faster
    slow_int8 = {"all-int8": Figures(10.0, 0.95), "first-float": Figures(9.0, 0.95)}
    assert choose(0.95, slow_int8, 0.5)[0] == "first-float"  # where float is faster, it is kept


def test_a_float_layer_is_kept_only_where_the_budget_needs_it():
    figs = {"all-int8": Figures(13.3, 0.940), "first-float": Figures(15.7, 0.948)}
    winner, why = choose(0.950, figs, 0.5)
    assert winner == "first-float" and why.startswith("first-float: the fastest within the 0.5-point budget")
    assert "all-int8 13.3 ms -1.00 pt" in why and "first-float 15.7 ms -0.20 pt" in why and "FP32 95.00 %" in why
    assert choose(0.950, figs, 1.0)[0] == "all-int8"  # a larger budget: INT8 everywhere
    assert choose(0.950, {"all-int8": Figures(13.3, 0.945), **{k: v for k, v in figs.items() if k != "all-int8"}},
                  0.5)[0] == "all-int8"  # exactly 0.5 points: within


def test_without_a_candidate_in_budget_the_most_accurate_wins_and_of_equals_the_fastest():
    figs = {"all-int8": Figures(13.3, 0.80), "first-float": Figures(15.7, 0.90), "last-float": Figures(13.5, 0.90)}
    winner, why = choose(0.95, figs, 0.5)
    assert winner == "last-float" and "none within the 0.5-point budget: the most accurate" in why


def test_speeds_within_noise_count_as_equal_and_fewer_float_layers_win():
    figs = {"all-int8": Figures(1.01, 0.95), "first-float": Figures(1.00, 0.95)}
    winner, why = choose(0.95, figs, 0.5)
    assert winner == "all-int8" and "as fast as first-float, the fastest within the 0.5-point budget (within 2 %" in why
    assert choose(0.95, figs, 0.5, same_speed_pct=0.0)[0] == "first-float"
    noisy = {"all-int8": Figures(1.10, 0.95, noise_pct=12.0), "first-float": Figures(1.00, 0.95, noise_pct=3.0)}
    assert choose(0.95, noisy, 0.5)[0] == "all-int8"  # 10 % apart in a run whose own noise is 12 %
    clear = {"all-int8": Figures(1.20, 0.95, noise_pct=3.0), "first-float": Figures(1.00, 0.95, noise_pct=3.0)}
    assert choose(0.95, clear, 0.5)[0] == "first-float"


# ---------------------------------------------------------------- candidates, recipe, config


def test_candidates_are_the_combinations_of_the_auto_options_fewest_float_layers_first():
    assert {k: (c.ignore_first, c.ignore_last) for k, c in int8_choice.candidates(NNCFOptions()).items()} == {
        "all-int8": (False, False), "first-float": (True, False)}
    assert list(int8_choice.candidates(NNCFOptions(ignore_last="auto"))) == [
        "all-int8", "first-float", "last-float", "first+last-float"]
    assert list(int8_choice.candidates(NNCFOptions(ignore_first=True))) == ["first-float"]  # set: nothing to measure


def test_the_recipe_says_auto_with_its_budget_protocol_and_cpu_and_int8_acc_quantizes_every_layer():
    used, method = precisions.get("int8").recipe("openvino", precisions.get("int8").options(QuantConfig()), 32)
    assert used["ignore_first"] == "auto" and used["ignore_last"] is False and used["auto_max_drop"] == 0.5
    assert used["resolved_for_cpu"].startswith(cpu_info()[0]) and "interleaved" in used["auto_protocol"]
    assert used["auto_max_images"] == 500 and "val top-1 on at most 500 images" in used["auto_protocol"]
    assert method.endswith("first layer in float only where this CPU's measurement needs it (budget 0.5 points)")
    fixed, fixed_method = precisions.get("int8").recipe("openvino", int8.Int8Options(nncf={"ignore_first": True}), 32)
    assert fixed["ignore_first"] is True and not {"auto_max_drop", "resolved_for_cpu"} & set(fixed)
    assert fixed_method.endswith("first layer in float")
    acc, _ = precisions.get("int8-acc").recipe("openvino", precisions.get("int8-acc").options(QuantConfig()), 32)
    assert acc["ignore_first"] is False and not {"auto_max_drop", "auto_max_images"} & set(acc)  # accuracy control


def test_auto_options_in_the_config(tiny_raw):
    def nncf(**kw):
        return {**tiny_raw, "variants": {**tiny_raw["variants"], "quant": {"nncf": kw}}}

    assert parse_config(nncf()).variants.quant.nncf.ignore_first == "auto"
    cfg = parse_config(nncf(ignore_first=False, ignore_last="auto", auto_max_drop=1.5)).variants.quant.nncf
    assert (cfg.ignore_first, cfg.ignore_last, cfg.auto_max_drop) == (False, "auto", 1.5)
    with pytest.raises(ConfigError, match=r"^tiny.yaml: variants.quant.nncf.ignore_first: Input should be"):
        parse_config(nncf(ignore_first="sometimes"), "tiny.yaml")
    with pytest.raises(ConfigError, match=r"^tiny.yaml: variants.quant.nncf.auto_max_drop: Input should be greater"):
        parse_config(nncf(auto_max_drop=-1), "tiny.yaml")
    assert parse_config(nncf(auto_max_images=64)).variants.quant.nncf.auto_max_images == 64
    with pytest.raises(ConfigError, match=r"^tiny.yaml: variants.quant.nncf.auto_max_images: Input should be greater"):
        parse_config(nncf(auto_max_images=0), "tiny.yaml")


def test_auto_scores_fp32_and_every_candidate_on_the_same_capped_sample_of_val(digits, monkeypatch):
    """A val split larger than ``auto_max_images`` is sampled (seeded, the same images for every model); a
    smaller one is scored whole."""
    seen = {}

    def measure_models(models, batches, x, **kw):
        out = {}
        for key in models:
            images = np.concatenate(list(batches()))
            seen[key] = images
            out[key] = Measured(predictions=np.zeros(len(images), np.int32), coverage={}, settings={},
                                latency=SimpleNamespace(p50_ms=1.0, noise_pct=0.0))
        return out

    monkeypatch.setattr(latency, "measure_models", measure_models)
    files = {"all-int8": Path("a.xml"), "first-float": Path("b.xml")}
    figures = int8_choice.measure("openvino", Path("fp32.xml"), files, Inputs(digits, 8), 50)
    assert set(figures) == set(seen) == {"fp32", *files} and digits.size("val") > 50
    assert all(len(images) == 50 and np.array_equal(images, seen["fp32"]) for images in seen.values())
    int8_choice.measure("openvino", Path("fp32.xml"), files, Inputs(digits, 8), 10_000)
    assert {len(images) for images in seen.values()} == {digits.size("val")}


# ---------------------------------------------------------------- on the digits student


@pytest.fixture(scope="module")
def fp32_ir(digits, student_ckpt):
    return export_checkpoint(student_ckpt, "openvino", digits, "student-fp32-openvino")


def quant(**nncf) -> QuantConfig:
    return QuantConfig(calibration_samples=32, nncf=nncf)


def int8_layers(path: Path):
    backend = nncf_backend.BACKENDS["openvino"]
    return [layer.int8 for layer in backend.layers(backend.load(path))[0]]


@pytest.fixture
def injected(monkeypatch):
    """Figures injected at the measuring function's boundary (val top-1, p50 by key); the calls recorded."""
    calls, figures = [], {}

    def measure(runtime, fp32, files, inputs, max_images):
        calls.append(sorted(files))
        return {k: {"p50_ms": figures[k][0], "val_accuracy": figures[k][1], "noise_pct": 0.0} for k in ("fp32", *files)}

    monkeypatch.setattr(int8_choice, "measure", measure)
    return calls, figures


@slow
def test_auto_writes_every_layer_int8_when_it_is_faster_and_within_budget(digits, fp32_ir, injected):
    calls, figures = injected
    figures.update({"fp32": (4.0, 0.950), "all-int8": (1.0, 0.948), "first-float": (1.2, 0.950)})
    art = quantize_model(fp32_ir, "int8", digits, quant(), 0, "auto-all-int8-openvino")
    assert not art.failed, art.manifest.get("reason")
    assert calls == [["all-int8", "first-float"]]  # both built, measured once together
    choice = art.manifest["int8_choice"]
    assert choice["winner"] == "all-int8" and choice["ignore_first"] is False and choice["max_drop_points"] == 0.5
    assert choice["candidates"]["all-int8"]["drop_points"] == pytest.approx(0.2)
    assert choice["candidates"]["all-int8"]["speedup_vs_fp32"] == pytest.approx(4.0)
    assert choice["resolved_for_cpu"] == int8_choice.cpu_text() and choice["fp32"]["val_accuracy"] == 0.95
    assert choice["val_images"] == min(500, digits.size("val"))  # the default cap, recorded
    assert art.manifest["nncf"]["ignored_layers"] == [] and all(int8_layers(art.model_file))
    assert art.manifest["recipe"]["ignore_first"] == "auto"


@slow
def test_auto_keeps_the_first_layer_in_float_when_every_layer_int8_breaks_the_budget(digits, fp32_ir, injected):
    calls, figures = injected
    figures.update({"fp32": (4.0, 0.950), "all-int8": (1.0, 0.930), "first-float": (1.2, 0.949)})
    art = quantize_model(fp32_ir, "int8", digits, quant(auto_max_images=100), 0, "auto-first-float-openvino")
    choice = art.manifest["int8_choice"]
    assert choice["winner"] == "first-float" and choice["ignore_first"] is True and choice["val_images"] == 100
    assert "first-float: the fastest within the 0.5-point budget" in choice["why"]
    first = choice["candidates"]["first-float"]["ignored_layers"]
    assert art.manifest["nncf"]["ignored_layers"] == first and len(first) == 1
    assert int8_layers(art.model_file) == [False, True, True, True]
    assert int8_coverage("openvino", art.model_file) == {"int8_ops": 3, "float_ops": 1, "int8_fraction": 0.75}


@slow
def test_an_explicit_choice_is_not_measured(digits, fp32_ir, injected):
    calls, _ = injected
    for value, layers in ((True, [False, True, True, True]), (False, [True] * 4)):
        art = quantize_model(fp32_ir, "int8", digits, quant(ignore_first=value), 0, f"set-{value}-int8-openvino")
        assert "int8_choice" not in art.manifest and int8_layers(art.model_file) == layers
    assert calls == []


@slow
def test_auto_measured_for_real_records_figures_that_explain_the_winner(digits, fp32_ir):
    art = quantize_model(fp32_ir, "int8", digits, quant(), 0, "auto-measured-int8-openvino")
    assert not art.failed, art.manifest.get("reason")
    choice, y = art.manifest["int8_choice"], digits.labels("val")
    cands = choice["candidates"]
    assert list(cands) == ["all-int8", "first-float"] and choice["runtime"] == "openvino"
    assert all(c["p50_ms"] > 0 and c["precision"] == "f32" and 0.5 < c["agreement_with_fp32"] <= 1 for c in cands.values())
    assert (cands["all-int8"]["int8_layers"], cands["first-float"]["int8_layers"]) == (4, 3)
    # the decision is choose() on the recorded figures, and the file written is the winner
    figs = {k: Figures(c["p50_ms"], c["val_accuracy"], c["noise_pct"]) for k, c in cands.items()}
    assert choose(choice["fp32"]["val_accuracy"], figs, 0.5)[0] == choice["winner"]
    assert art.manifest["nncf"]["ignored_layers"] == cands[choice["winner"]]["ignored_layers"]
    x = digits.split("val")[0]
    for path, acc in ((fp32_ir.model_file, choice["fp32"]["val_accuracy"]),
                      (art.model_file, cands[choice["winner"]]["val_accuracy"])):
        assert float((make_predictor("openvino", path).predict_batched(x).argmax(1) == y).mean()) == pytest.approx(acc)


@slow
@pytest.mark.skipif(not cpu_info()[1] & set(BF16_FLAGS), reason="this CPU has no bf16")
def test_candidates_are_measured_in_the_precision_asked(digits, fp32_ir, tmp_path):
    options = precisions.get("int8").options(quant())
    facts = int8.quantize_openvino(fp32_ir.model_file, tmp_path / "model.xml", options, Inputs(digits, 32),
                                   precision="bf16")
    choice = facts["int8_choice"]
    assert choice["fp32"]["precision"] == "f32"
    assert {c["precision"] for c in choice["candidates"].values()} == {"bf16"}


@slow
def test_candidates_share_one_calibration_pass_and_equal_nncf_quantize(digits, fp32_ir, monkeypatch, tmp_path):
    import nncf
    from nncf.quantization.algorithms import pipeline

    passes = []
    collect = pipeline.collect_statistics
    monkeypatch.setattr(pipeline, "collect_statistics", lambda *a: passes.append(1) or collect(*a))
    calibration, backend = Inputs(digits, 32).calibration, nncf_backend.BACKENDS["openvino"]
    options = list(int8_choice.candidates(NNCFOptions()).values())
    shared = nncf_backend.quantize_each(backend.load(fp32_ir.model_file), "openvino", calibration, options)
    assert len(passes) == 1
    x = digits.split("val")[0][:64]
    for i, ((model, resolved), o) in enumerate(zip(shared, options)):
        original = backend.load(fp32_ir.model_file)
        kwargs, alone = nncf_backend.arguments(o, original, "openvino", len(calibration))
        ref = nncf.quantize(original, nncf_backend.calibration_dataset(original, "openvino", calibration), **kwargs)
        assert resolved == alone
        outputs = []
        for j, m in enumerate((model, ref)):
            backend.save(m, tmp_path / f"{i}-{j}.xml")
            outputs.append(make_predictor("openvino", tmp_path / f"{i}-{j}.xml").predict_batched(x))
        np.testing.assert_array_equal(outputs[0], outputs[1])
