"""What the search tests share (tests/test_search.py, and tests/test_team_stack.py's PostgreSQL study): the
tiny student's search config, worker processes on one study, and the check that two of them ran disjoint
trials."""

import json
import os
import subprocess
import sys

from edgeopt.plan import parse_config
from edgeopt.search.outcome import search_report
from edgeopt.search.study import open_study, study_name
from tests._tiny import ROOT, TINY

# The tiny student on digits, pruned 0.2 ... 0.8, measured as FP32 ONNX on ONNX Runtime
SEARCH = {"shrink": {"prune": {"range": [0.2, 0.8], "step": 0.2, "finetune_epochs": 2, "lr": 0.02, "round_to": None}},
          "budget": {"trials": 4}, "survivors": 1, "start_from_grid": False}
WORKER = """
import json, sys
from edgeopt.artifacts import Checkpoint, Dataset
from edgeopt.plan import parse_config
from edgeopt.search.study import run_worker
cfg = parse_config(json.load(open(sys.argv[1])))
out = run_worker(cfg, Dataset(sys.argv[2]), {"student": Checkpoint(sys.argv[3])}, Checkpoint(sys.argv[4]), int(sys.argv[5]))
print("WORKER " + json.dumps(out))
"""


def search_config(tmp_path, tiny_raw, name="s", objective="size", constraints=None, **search):
    """``search`` overrides SEARCH (``storage``: a database other than an SQLite file in ``tmp_path``)."""
    raw = {**tiny_raw, "variants": {**TINY["variants"], "formats": ["onnx"], "runtimes": ["onnxruntime"],
                                    "quantization": ["fp32"],
                                    "search": {**SEARCH, "storage": f"sqlite:///{tmp_path / 'search.db'}",
                                               "study": name, **search}},
           "selection": {"objective": objective},
           "target": {**TINY["target"], "constraints": {"max_accuracy_drop": 10.0, **(constraints or {})}}}
    return parse_config(raw)


def trials_of(cfg, digits, student_ckpt):
    return search_report(cfg, digits, {"student": student_ckpt}).trials


def spawn(cfg, tmp_path, digits, student_ckpt, teacher_ckpt, worker=0):
    """A worker process (this process's environment: a database password in PGPASSWORD travels with it)."""
    path = tmp_path / f"config-{worker}.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(digits.path), str(student_ckpt.path),
                             str(teacher_ckpt.path), str(worker)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})


def summary(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("WORKER "))[7:])


def check_two_workers_run_disjoint_trials(cfg, tmp_path, digits, teacher_ckpt, student_ckpt) -> None:
    """Two worker processes on ``cfg``'s study: each runs trials, none runs another's, and together they run
    every trial of the study, the budget's worth (repeats aside), all finished."""
    open_study(cfg, study_name(cfg, digits, {"student": student_ckpt}))  # the tables, before two processes race
    procs = [spawn(cfg, tmp_path, digits, student_ckpt, teacher_ckpt, worker=i) for i in range(2)]
    a, b = (summary(p) for p in procs)
    assert a["worker"] != b["worker"] and a["trials"] and b["trials"]
    assert not set(a["trials"]) & set(b["trials"])
    trials = trials_of(cfg, digits, student_ckpt)
    assert sorted(a["trials"] + b["trials"]) == [t.number for t in trials]
    # the budget's worth, less the repeats (a trial asking for a finished trial's parameters is not counted)
    assert len([t for t in trials if not t.stop.startswith("a repeat of")]) == cfg.variants.search.budget.trials
    assert {t.worker for t in trials} == {a["worker"], b["worker"]}
    assert all(t.state in ("COMPLETE", "PRUNED") for t in trials)
