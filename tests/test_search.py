"""Search, not a grid (variants.search): a study that resumes after SIGKILL, workers in parallel on one
SQLite study, rejection before any fine-tune (the fine-tunes counted), one fine-tune per trial continued
through its rungs (the optimizer steps counted), the same trials for the same seed, and a size target met
with the least pruning, through the pipeline's own evaluate, select and promote."""

import os
import re
import signal
import time

import pytest

import edgeopt.shrink.run as shrink_run
import edgeopt.train.fit as train_fit
from edgeopt.plan import parse_config
from edgeopt.search.outcome import render, search_report
from edgeopt.search.probe import Prober
from edgeopt.search.space import Candidate
from edgeopt.search.study import open_study, run_worker, study_name
from tests._search import SEARCH, check_two_workers_run_disjoint_trials, search_config, spawn, trials_of
from tests._tiny import TINY


@pytest.fixture
def fine_tunes(monkeypatch):
    """Every KD fine-tune run in this process (``fit`` as shrink_base calls it): [steps it was sized for,
    optimizer steps it took (counted by a hook on its optimizer)]."""
    calls = []
    real_fit, real_optimizer = shrink_run.fit, train_fit.make_optimizer

    def counted(model, dataset, cfg, **kw):
        calls.append([cfg.steps, 0])
        return real_fit(model, dataset, cfg, **kw)

    def hooked(model, cfg):
        optimizer = real_optimizer(model, cfg)
        if calls:
            optimizer.register_step_post_hook(lambda *_: calls[-1].__setitem__(1, calls[-1][1] + 1))
        return optimizer

    monkeypatch.setattr(shrink_run, "fit", counted)
    monkeypatch.setattr(train_fit, "make_optimizer", hooked)
    return calls


def test_the_search_section_is_checked_up_front_and_replaces_the_grid(tiny_raw):
    from edgeopt.config import ConfigError
    from edgeopt.plan import variant_plan

    def variants(**search):
        return {**tiny_raw, "variants": {**TINY["variants"], "search": {**SEARCH, **search}}}

    cfg = parse_config(variants(survivors=2))
    assert parse_config(cfg.model_dump(mode="json")) == cfg  # the pipeline gets the config dumped
    plan = variant_plan(cfg)
    assert [s.key for s in plan.shrinks] == ["teacher", "student", "student-s1", "student-s2"]  # no grid amount
    assert "student-s2-int8-openvino@openvino" in plan.names() and plan.search_workers == ["search_worker_0"]
    for bad, message in [
        ({"shrink": {"prune": {"range": [0.6, 0.2]}}}, "prune.range: expected 0 < lo < hi < 1"),
        ({"shrink": {"prune": {"amounts": [0.2]}}}, "prune.amounts: a search takes a range"),
        ({"shrink": {"prune": {"range": [0.2, 0.4], "choices": {"importance": ["l2", "nope"]}}}}, "prune.importance"),
        ({"shrink": {"prune": {"range": [0.2, 0.4], "choices": {"colour": ["red"]}}}}, "not an option of prune"),
        ({"shrink": {"magic": {"range": [0.2, 0.4]}}}, "unknown technique 'magic'"),
        ({"budget": {"trials": None, "wall_minutes": None}}, "set trials, wall_minutes or both"),
        ({"storage": "sqlite:///relative.db"}, "absolute"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(variants(**bad))


def sizes_at(cfg, digits, teacher_ckpt, student_ckpt, amounts):
    """The FP32 ONNX size of the student pruned by each amount (no fine-tune: it does not change the size)."""
    with Prober(cfg, digits, {"student": student_ckpt}, teacher_ckpt, 0) as prober:
        return [prober.probe(Candidate("student", "prune", a)).combos["fp32-onnx@onnxruntime"].size_mb
                for a in amounts]


def test_a_study_killed_mid_trial_resumes_without_repeating_finished_trials(tmp_path, tiny_raw, digits,
                                                                           teacher_ckpt, student_ckpt):
    import optuna

    cfg = search_config(tmp_path, tiny_raw, "resume", budget={"trials": 4})
    name = study_name(cfg, digits, {"student": student_ckpt})
    proc = spawn(cfg, tmp_path, digits, student_ckpt, teacher_ckpt)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name=name, storage=cfg.variants.search.storage).get_trials()
        except Exception:  # noqa: BLE001 - not created yet, its tables being created, or locked a moment
            continue
        finished = [t for t in trials if t.state.is_finished()]
        running = [t for t in trials if t.state.name == "RUNNING" and "worker" in t.user_attrs]
        if finished and running:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the worker finished before it could be killed mid-trial"
    before = {t.number: (t.state.name, t.user_attrs.get("stop")) for t in finished}
    killed = running[0].number

    resumed = run_worker(cfg, digits, {"student": student_ckpt}, teacher_ckpt)
    after = {t.number: t for t in trials_of(cfg, digits, student_ckpt)}
    assert {n: (after[n].state, after[n].stop) for n in before} == before  # finished trials kept as they were
    assert after[killed].state == "FAIL" and after[killed].stop.startswith("killed")
    assert not set(resumed["trials"]) & set(before)  # none of them ran again
    counted = [t for t in after.values() if t.state in ("COMPLETE", "PRUNED") and not t.stop.startswith("a repeat of")]
    assert len(counted) + sum(t.state == "RUNNING" for t in after.values()) == 4  # the budget, across both runs
    again = int(after[killed].stop.rsplit("#", 1)[1])  # the killed trial's candidate, enqueued again
    assert again in resumed["trials"] and after[again].amount == after[killed].amount
    for t in after.values():  # a candidate finished before the kill is never trained again
        if t.number in resumed["trials"] and any(after[n].amount == t.amount for n in before):
            assert t.same_as is not None and not t.trained


def test_a_repeat_of_a_finished_trials_parameters_is_not_measured_trained_or_counted(
        tmp_path, tiny_raw, digits, teacher_ckpt, student_ckpt, fine_tunes, monkeypatch):
    cfg = search_config(tmp_path, tiny_raw, "repeat", budget={"trials": 2})
    study = open_study(cfg, study_name(cfg, digits, {"student": student_ckpt}))
    for _ in range(2):  # what TPE does on a small lattice: the same parameters asked for again
        study.enqueue_trial({"prune.amount": 0.4})
    probed, real_probe = [], Prober.probe
    monkeypatch.setattr(Prober, "probe", lambda self, cand: probed.append(cand.amount) or real_probe(self, cand))
    run_worker(cfg, digits, {"student": student_ckpt}, teacher_ckpt)
    trials = trials_of(cfg, digits, student_ckpt)
    repeats = [t for t in trials if t.stop.startswith("a repeat of trial #")]
    assert trials[1] in repeats and trials[1].same_as == 0 and trials[1].value == trials[0].value, render(
        search_report(cfg, digits, {"student": student_ckpt}))
    assert len(trials) - len(repeats) == 2 == len(probed)  # the budget: only the trials measured count
    assert len(fine_tunes) == sum(t.trained for t in trials) and not any(t.trained for t in repeats)


def test_two_workers_on_one_sqlite_study_run_disjoint_trials(tmp_path, tiny_raw, digits, teacher_ckpt, student_ckpt):
    cfg = search_config(tmp_path, tiny_raw, "pair", budget={"trials": 4})
    check_two_workers_run_disjoint_trials(cfg, tmp_path, digits, teacher_ckpt, student_ckpt)


def test_a_size_target_is_met_with_the_least_pruning_and_rejected_candidates_are_never_trained(
        tmp_path, tiny_raw, digits, teacher_ckpt, student_ckpt, fine_tunes):
    sizes = sizes_at(search_config(tmp_path, tiny_raw), digits, teacher_ckpt, student_ckpt, (0.2, 0.4))
    assert sizes[1] < sizes[0] and not fine_tunes
    # 0.2 (and the student itself) break the target, 0.4 meets it, 0.6 and 0.8 prune more than that
    cfg = search_config(tmp_path, tiny_raw, "target", objective="latency",
                        constraints={"max_size_mb": (sizes[0] + sizes[1]) / 2}, start_from_grid=True)
    cfg = parse_config({**cfg.model_dump(mode="json"), "variants": {
        **cfg.model_dump(mode="json")["variants"],
        "shrink": {"prune": {"amounts": [0.2, 0.4, 0.6, 0.8], "round_to": None}}}})
    run_worker(cfg, digits, {"student": student_ckpt}, teacher_ckpt)
    report = search_report(cfg, digits, {"student": student_ckpt})
    by_amount = {t.amount: t for t in report.trials}
    assert sorted(by_amount) == [0.2, 0.4, 0.6, 0.8], render(report)
    assert "breaks the target" in by_amount[0.2].stop
    assert all("dominated" in by_amount[a].stop for a in (0.6, 0.8)), render(report)
    assert report.objective["student"] == "least compression that meets the target"
    trained = [t for t in report.trials if t.rungs]
    assert [t.amount for t in trained] == [0.4]
    t = by_amount[0.4]  # the only fine-tune: 0.4's, one through its rungs
    assert fine_tunes == [[t.rungs[-1][0], t.steps]] and t.steps == t.rungs[-1][0] == report.finetune_steps
    assert [(s.slot, s.amount) for s in report.survivors] == [(1, 0.4)]
    assert "least compression that meets the target" in report.survivors[0].why


def test_the_same_seed_gives_the_same_trials_and_a_promoted_trial_continues_its_fine_tune(
        tmp_path, tiny_raw, digits, teacher_ckpt, student_ckpt, fine_tunes):
    def trials(name, seed):
        cfg = search_config(tmp_path, tiny_raw, name, budget={"trials": 4}, seed=seed)
        del fine_tunes[:]
        run_worker(cfg, digits, {"student": student_ckpt}, teacher_ckpt)
        report = search_report(cfg, digits, {"student": student_ckpt})
        # one fine-tune per trained trial, its optimizer steps those of the rung it stopped at: a promoted trial
        # continued its fine-tune (steps 1..r2), it did not repeat the first rung's (1..r1, then 1..r2)
        trained = [t for t in report.trials if t.trained]
        assert [steps for _, steps in fine_tunes] == [t.steps for t in trained], render(report)
        assert all(t.steps == t.rungs[-1][0] for t in trained) and report.finetune_steps == sum(t.steps for t in trained)
        assert len({planned for planned, _ in fine_tunes}) == 1  # every fine-tune sized for the last rung
        promoted = [t for t in trained if len(t.rungs) > 1]
        assert promoted and all(t.steps < sum(r[0] for r in t.rungs) for t in promoted), render(report)
        assert report.restart_steps - report.finetune_steps == sum(r[0] for t in trained for r in t.rungs[:-1])
        return [(t.amount, t.state, t.stop.split(":")[0], t.value, t.rungs, t.steps) for t in report.trials], \
            report.survivors

    first, again = trials("seed-a", 3), trials("seed-b", 3)
    assert first == again
    assert len({a for a, *_ in first[0]}) > 1  # the sampler moved


@pytest.mark.slow  # a whole pipeline run
def test_the_pipeline_promotes_the_survivor_that_meets_the_target(tmp_path, tiny_raw, digits, teacher_ckpt,
                                                                  student_ckpt):
    from edgeopt_zenml.pipelines.runner import run_pipeline

    small, large = sizes_at(search_config(tmp_path, tiny_raw), digits, teacher_ckpt, student_ckpt, (0.4, 0.2))
    target = (small + large) / 2  # met from 0.4 on; a tiny student pruned that much loses points: allow them
    cfg = search_config(tmp_path, tiny_raw, "pipeline", objective="latency", budget={"trials": 3},
                        constraints={"max_size_mb": target, "max_accuracy_drop": 40.0}, start_from_grid=True)
    raw = cfg.model_dump(mode="json")
    raw["variants"]["shrink"] = {"prune": {"amounts": [0.2, 0.4, 0.6], "round_to": None}}
    cfg = parse_config(raw)
    result = run_pipeline(cfg, run_name="search-pipeline")
    ev, sel = result["evaluation"], result["selection"]
    names = {r.variant for r in ev.results}
    assert "student-s1-fp32-onnx@onnxruntime" in names
    report = search_report(cfg, digits, {"student": student_ckpt})
    s1 = report.slot("student", 1)
    met = [t for t in report.trials if t.combos and all(c["size_mb"] <= target for c in t.combos.values())]
    assert s1 is not None and met and s1.amount == min(t.amount for t in met)
    assert sel.winner == "student-s1-fp32-onnx@onnxruntime", sel.reason
    s1_result = ev.result(sel.winner)
    assert s1_result.metrics["size_mb"] <= target and s1_result.recipe["amount"] == s1.amount
    assert result["promotion"] is not None
