"""The study: an Optuna study in a database, and the worker that runs its trials.

The study lives in an RDB storage (SQLite beside a SQLite tracking store or in edgeopt's state folder;
the team stack's PostgreSQL with ``variants.search.storage``), under a name made of what its trials
depend on (:func:`study_name`), so that:

- a killed run resumes where it stopped: finished trials stay finished and count against the budget; a
  trial left RUNNING by a worker that died is failed and its parameters enqueued again (at once when
  the worker ran on this host, else after its heartbeat goes stale);
- several workers (processes, pods) run trials of one study at once, each its own trial (Optuna hands
  an enqueued trial to one worker; the TPE sampler's constant liar keeps concurrent suggestions apart).

Optuna is imported inside the functions: validating a config imports none of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from edgeopt.artifacts import Checkpoint, Dataset, process_alive
from edgeopt.config import RunConfig, state_dir
from edgeopt.search.probe import Prober, full_steps, rung_steps
from edgeopt.search.space import Candidate, Combo, Judge, Probe, grid_params, suggest

log = logging.getLogger(__name__)

HEARTBEAT_S, GRACE_S = 30, 300  # a trial whose worker stopped beating this long ago is failed and retried
# a repeat (the sampler asking again for parameters a finished trial had) is not counted against the budget;
# a study that holds this many times its trial budget has a sampler that only repeats itself: the space is spent
MAX_TRIALS_PER_BUDGET = 4
# what a study's trials do not depend on: the name is the same when these change (a larger budget resumes it)
NOT_IN_STUDY = ("budget", "workers", "storage", "study", "survivors")
RUN_SECTIONS = ("seed", "data", "teacher", "student", "target", "selection")


class SearchTrialError(RuntimeError):
    """A trial that could not be judged (a model that does not build, a fine-tune that did not run)."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def storage_url(cfg: RunConfig) -> str:
    """``variants.search.storage``, else ``search.db`` beside a SQLite tracking store, else in the state folder."""
    assert cfg.variants.search is not None
    if cfg.variants.search.storage:
        return cfg.variants.search.storage
    uri = cfg.tracking_uri()
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else state_dir()
    return f"sqlite:///{folder / 'search.db'}"


def study_name(cfg: RunConfig, dataset: Dataset, bases: Dict[str, Checkpoint]) -> str:
    """``<run name>-<hash>`` of what the trials depend on: the config (less the budget, the workers and
    where the study lives), the data and the base models."""
    assert cfg.variants.search is not None
    if cfg.variants.search.study:
        return cfg.variants.search.study
    raw = cfg.model_dump(mode="json")
    variants = {k: v for k, v in raw["variants"].items() if k != "search"}
    search = {k: v for k, v in raw["variants"]["search"].items() if k not in NOT_IN_STUDY}
    key = {**{k: raw[k] for k in RUN_SECTIONS}, "variants": variants, "search": search, "data": dataset.data_hash,
           "bases": {b: c.content_hash for b, c in sorted(bases.items())}}
    return f"{cfg.name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


def _retry(study: Any, trial: Any) -> None:
    """A trial whose worker died (failed by now): its parameters enqueued again, as ``retry_of`` it."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def retried(trials: List[Any]) -> Dict[int, int]:
    """Killed trial -> the trial that ran its parameters again."""
    return {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}


def open_study(cfg: RunConfig, name: str, worker: int = 0, *, load_only: bool = False) -> Any:
    """The study ``name`` in the run's storage (created on first use), with its sampler and pruner."""
    import optuna

    search = cfg.variants.search
    assert search is not None
    url = storage_url(cfg)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the heartbeat and TPE's group are "experimental" in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 300}} if url.startswith("sqlite") else None,
            heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, heartbeat_stale_trial_callback=_retry)
        return _create(cfg, name, worker, storage, load_only)


def _create(cfg: RunConfig, name: str, worker: int, storage: Any, load_only: bool) -> Any:
    import optuna

    search = cfg.variants.search
    assert search is not None
    if load_only:
        return optuna.load_study(study_name=name, storage=storage)
    seed = (cfg.seed if search.seed is None else search.seed) + worker
    startup = max(2, min(10, (search.budget.trials or 16) // 4))
    sampler = (optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup) if search.sampler == "gp" else
               optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=startup))
    # rungs are reported at steps reduction_factor**k (k: the rung), whatever their fine-tune lengths
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=search.reduction_factor,
                                                    min_early_stopping_rate=0)
    for attempt in range(3):  # workers starting together on a new database race to create its tables
        try:
            return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                       direction="maximize", load_if_exists=True)
        except Exception:  # noqa: BLE001 - the loser of the race tries again
            if attempt == 2:
                raise
            time.sleep(1 + attempt)


def recover(study: Any) -> List[int]:
    """Fail the RUNNING trials of workers on this host that are gone, and enqueue them again."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host, out = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        h, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if h != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        _retry(study, t)
        out.append(t.number)
    return out


def used(study: Any) -> int:
    """Trials that count against the budget: finished or running, less the ones killed with their worker and
    the repeats (TPE asked for the same parameters again: on a lattice of a dozen amounts it does, and a
    brought model's run of 8 trials lost 3 of them so)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    killed = retried(trials)
    return sum(1 for t in trials if t.state != TrialState.WAITING and t.number not in killed
               and "repeat_of" not in t.user_attrs)


def load_probe(d: Dict[str, Any]) -> Probe:
    return Probe(**{**d, "combos": {k: Combo(**c) for k, c in d["combos"].items()}})


class Worker:
    """Runs trials of one study on this machine until the budget is spent."""

    def __init__(self, cfg: RunConfig, dataset: Dataset, bases: Dict[str, Checkpoint], prober: Prober):
        assert cfg.variants.search is not None
        self.cfg, self.search, self.prober = cfg, cfg.variants.search, prober
        s = self.search
        # (base, technique) -> the fine-tune steps of each successive-halving rung
        self.rungs: Dict[tuple, List[int]] = {
            (b, t): rung_steps(full_steps(bases[b], dataset, r.options), s.short_finetune, s.rungs, s.reduction_factor)
            for b in cfg.variants.bases for t, r in s.shrink.items()}
        self.judges: Dict[str, Judge] = {}
        self.ran: List[int] = []

    def shared(self, study: Any, key: str, compute: Callable[[], Any]) -> Any:
        """A study-wide fact, computed by the first worker that needs it, read by every other."""
        if key not in study.user_attrs:
            study.set_user_attr(key, compute())
        return study.user_attrs[key]

    def judge(self, study: Any, base: str) -> Judge:
        if base not in self.judges:
            combos = self.shared(study, f"base.{base}", lambda: {k: asdict(c) for k, c in
                                                                 self.prober.base_combos(base).items()})
            binding = Judge.of(self.cfg, False).binds({k: Combo(**c) for k, c in combos.items()})
            self.judges[base] = Judge.of(self.cfg, binding)
        return self.judges[base]

    def peers(self, study: Any, trial: Any, cand: Candidate) -> List[Any]:
        """Measured trials of the candidate's family (finished or running), not this one."""
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        return [t for t in study.get_trials(deepcopy=False, states=states)
                if t.number != trial.number and "probe" in t.user_attrs
                and tuple(t.user_attrs["family"]) == _family_key(cand)]

    def objective(self, trial: Any) -> float:
        import optuna

        cand = suggest(trial, self.cfg.variants.bases, self.search.shrink)
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("candidate", {"base": cand.base, "technique": cand.technique, "amount": cand.amount,
                                          "choices": dict(cand.choices), "label": cand.label})
        trial.set_user_attr("family", list(_family_key(cand)))
        self.ran.append(trial.number)
        judge = self.judge(trial.study, cand.base)
        ref = self.shared(trial.study, "reference_accuracy", lambda: self.prober.reference_accuracy)

        def stop(reason: str) -> None:
            trial.set_user_attr("stop", reason)
            log.info("search: trial #%d %s: %s", trial.number, cand.label, reason)

        peers = self.peers(trial.study, trial, cand)
        repeat = next((t for t in peers if t.state.is_finished() and t.params == trial.params), None)
        if repeat is not None:  # not measured again either, and not counted against the budget (used)
            probe = load_probe(repeat.user_attrs["probe"])
            trial.set_user_attr("repeat_of", repeat.number)
        else:
            try:
                probe = self.prober.probe(cand)
            except Exception as err:  # noqa: BLE001 - a candidate that does not build is recorded, the search goes on
                stop(f"failed before fine-tune: {str(err).splitlines()[0][:300] if str(err) else type(err).__name__}")
                raise SearchTrialError(str(err)) from err
        trial.set_user_attr("probe", asdict(probe))
        twin = repeat or next((t for t in peers if t.user_attrs["probe"]["signature"] == probe.signature
                               and t.state.is_finished()), None)
        if twin is not None:
            trial.set_user_attr("same_as", twin.number)
            trial.set_user_attr("rungs", twin.user_attrs.get("rungs", []))
            stop(f"a repeat of trial #{twin.number}'s parameters: its outcome, not measured, trained or counted "
                 "against the budget again" if repeat is not None else
                 f"the same model as trial #{twin.number} (the same channels kept): its outcome, not trained again")
            if twin.state.name == "COMPLETE":
                return float(twin.value)
            last = max(twin.intermediate_values, default=None)
            if last is not None:
                trial.report(twin.intermediate_values[last], last)
            raise optuna.TrialPruned()
        if why := judge.breaks(probe):
            trial.report(-100 * judge.excess(probe), 0)
            stop(f"rejected before fine-tune: {why}")
            raise optuna.TrialPruned()
        others = [(f"the unpruned {cand.base}", self.prober.anchor(cand.base, probe))]
        others += [(f"trial #{t.number} ({t.user_attrs['candidate']['label']})", load_probe(t.user_attrs["probe"]))
                   for t in peers]
        by = next((what for what, other in others if judge.dominates(other, probe)), None)
        if by is not None:
            rule = ("meets the target wherever this one does" if judge.by_accuracy
                    else f"is as good at {judge.objective} (within the measured noise) wherever this one is feasible")
            trial.report(0.0, 0)
            stop(f"rejected before fine-tune: dominated: {by} keeps more of the model and {rule}")
            raise optuna.TrialPruned()
        rungs: List[List[float]] = []  # [steps run, val acc, drop, score] at each rung reached
        steps_list, rf = self.rungs[(cand.base, cand.technique)], self.search.reduction_factor
        halted: List[int] = []

        def at_rung(k: int, step: int, acc: float) -> None:
            drop = 100 * (ref - acc)
            rungs.append([step, acc, drop, judge.score(probe, drop)])
            trial.set_user_attr("rungs", rungs)
            trial.report(rungs[-1][3], rf ** k)

        def on_rung(k: int, acc: float) -> bool:
            """Rung ``k`` reached by the one fine-tune: its score reported; True stops the fine-tune there."""
            at_rung(k, steps_list[k], acc)
            if k < len(steps_list) - 1 and trial.should_prune():
                halted.append(k)
                return True
            return False

        ran, acc, why_not = self.prober.finetune(cand, steps_list, on_rung)
        trial.set_user_attr("finetune_steps", ran)  # optimizer steps, the rungs' continuations included once
        if acc is None:
            stop(f"failed: the {steps_list[-1]}-step fine-tune: {why_not}")
            raise SearchTrialError(why_not)
        if halted:
            last = rungs[-1]
            stop(f"stopped by successive halving after {ran} fine-tune steps (val acc {last[1]:.4f}, drop "
                 f"{last[2]:.2f} pt, score {last[3]:.2f}: not in the best 1/{rf} of its rung)")
            raise optuna.TrialPruned()
        if not rungs or rungs[-1][0] != ran:  # the fine-tune's own early stop (patience) between two rungs
            at_rung(len(rungs), ran, acc)
            stop(f"short fine-tune done: early stop at step {ran} of {steps_list[-1]}, val acc {acc:.4f}, "
                 f"drop {rungs[-1][2]:.2f} pt")
        else:
            stop(f"short fine-tune done: {ran} steps through {len(rungs)} rung(s), val acc {rungs[-1][1]:.4f}, "
                 f"drop {rungs[-1][2]:.2f} pt")
        return float(rungs[-1][3])

    def run(self, study: Any, wall_minutes: Optional[float], trials: Optional[int]) -> None:
        started = time.monotonic()
        while True:
            if wall_minutes is not None and time.monotonic() - started > 60 * wall_minutes:
                log.info("search: wall budget of %g min spent", wall_minutes)
                return
            if trials is not None and used(study) >= trials:
                return
            if trials is not None and len(study.get_trials(deepcopy=False)) >= MAX_TRIALS_PER_BUDGET * trials:
                log.info("search: %d trials for a budget of %d, the sampler only repeats itself: the space is spent",
                         len(study.get_trials(deepcopy=False)), trials)
                return
            study.optimize(self.objective, n_trials=1, catch=(SearchTrialError,))


def _family_key(cand: Candidate) -> tuple:
    return cand.base, cand.technique, json.dumps(dict(cand.choices), sort_keys=True)


def run_worker(cfg: RunConfig, dataset: Dataset, bases: Dict[str, Checkpoint], kd_teacher: Checkpoint,
               worker: int = 0) -> Dict[str, Any]:
    """Run trials of the run's study until its budget is spent (a resumed or shared study included);
    returns what this worker did: the study, its trials, its fine-tunes (steps each)."""
    import optuna

    search = cfg.variants.search
    assert search is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name(cfg, dataset, bases)
    study = open_study(cfg, name, worker)
    if revived := recover(study):
        log.info("search: trials %s of study %s were left running by a worker that is gone: enqueued again",
                 revived, name)
    if search.start_from_grid:
        for params in grid_params(cfg):
            study.enqueue_trial(params, skip_if_exists=True)
    start = time.monotonic()
    with Prober(cfg, dataset, bases, kd_teacher, cfg.seed) as prober:
        w = Worker(cfg, dataset, bases, prober)
        w.run(study, search.budget.wall_minutes, search.budget.trials)
    log.info("search: worker %d ran %d trial(s) of study %s in %.0f s (%d fine-tunes, %d steps)", worker, len(w.ran),
             name, time.monotonic() - start, len(prober.finetunes), sum(prober.finetunes))
    return {"study": name, "worker": worker_id(), "trials": w.ran, "finetunes": prober.finetunes,
            "seconds": time.monotonic() - start}
