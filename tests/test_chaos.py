"""Promotion, deployment and rollback across processes that share nothing but the tracking URI.

- Two promoters (separate processes, temp dirs and deploy roots), 20 rounds: exactly one champion
  a round.
- Chaos: a worker promotes, deploys and rolls back in a loop and is SIGKILLed at random points, 30
  times; after each kill ``current`` verifies against its manifest, loads, holds this model only, and
  serves what the registry alias names, or the next run's deploy step repairs it (counted).

``EDGEOPT_TEST_TRACKING_URI`` points both at another tracking server (e.g. ``http://...`` in front
of PostgreSQL); by default they share a SQLite store.
"""

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import uuid

import pytest

from edgeopt.deploy import champion as dep
from edgeopt.registry.versions import alias_version
from edgeopt.track.uri import client_for
from tests._deploy_kit import logged_run, promote, versions
from tests._tiny import ROOT

pytestmark = pytest.mark.slow  # spawned promoters and SIGKILL trials (docs/tests.md: the inner loop skips them)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """The shared store, its tables made before any worker starts (two processes creating them clash)."""
    uri = os.environ.get("EDGEOPT_TEST_TRACKING_URI") or f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client_for(uri).search_experiments()
    return uri


def _spawn(script: str, *args, log, tmpdir=None) -> subprocess.Popen:
    """``script`` in a fresh interpreter (stderr to ``log``); ``tmpdir``: a temp dir of its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if tmpdir is not None:
        os.makedirs(tmpdir, exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)


def _tail(log) -> str:
    return "".join(open(log).readlines()[-5:])


PROMOTER = """
import json, sys
from pathlib import Path
from edgeopt.deploy import champion as dep
from edgeopt.registry.versions import alias_version
from tests._deploy_kit import logged_run, promote
uri, name, root, host = sys.argv[1:5]
out, sys.stdout = sys.stdout, sys.stderr  # stdout is this protocol's; MLflow prints too
print("up", file=out, flush=True)
for line in sys.stdin:
    rid = logged_run(uri, 1000 * int(host) + int(line))  # this round's winner (a model of its own)
    mv = alias_version(uri, name, "champion")  # the champion this run measured
    print("ready", file=out, flush=True)
    sys.stdin.readline()
    res = promote(uri, name, rid, measured=str(mv.version) if mv else None)
    bundle = dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=Path(root))
    print(json.dumps({"promoted": res.promoted, "run_id": rid, "served": bundle.manifest["run_id"]}), file=out, flush=True)
"""


def test_two_promoters_sharing_only_the_tracking_uri_make_exactly_one_champion_a_round(uri, tmp_path):
    name = f"hosts-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / f"host{i}.log" for i in range(2)]
    hosts = [_spawn(PROMOTER, uri, name, tmp_path / f"host{i}" / "deploy", i, log=logs[i],
                    tmpdir=tmp_path / f"host{i}" / "tmp") for i in range(2)]
    try:
        for h, log in zip(hosts, logs):
            assert h.stdout.readline().strip() == "up", _tail(log)
        for rnd in range(20):
            for h in hosts:
                h.stdin.write(f"{rnd}\n")
                h.stdin.flush()
            for h, log in zip(hosts, logs):
                assert h.stdout.readline().strip() == "ready", _tail(log)
            before = len(versions(uri, name)) if rnd else 0
            for h in hosts:  # both go at once, both having measured the same champion
                h.stdin.write("go\n")
                h.stdin.flush()
            out = [json.loads(h.stdout.readline()) for h in hosts]
            assert sum(o["promoted"] for o in out) == 1, (rnd, out)
            winner = next(o["run_id"] for o in out if o["promoted"])
            assert alias_version(uri, name, "champion").run_id == winner
            assert len(versions(uri, name)) == before + 1  # one registration a round, no lost update
            assert all(o["served"] == winner for o in out)  # both deploy roots serve the champion
    finally:
        for h in hosts:
            h.kill()
            h.wait()


ZYGOTE = """
import os, random, sys
from pathlib import Path
from edgeopt.deploy import champion as dep
from edgeopt.runtimes import make_predictor  # noqa: F401 - imported once, before the forks
from tests._deploy_kit import logged_run, promote
uri, name, root, lease = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])


def say(line):  # one write: the parent and its forked child share this pipe
    os.write(1, f"{line}\\n".encode())


sys.stdout = sys.stderr  # fd 1 is this protocol's; MLflow prints too


def work(rng):
    while True:
        kind = "promote" if rng.random() < 0.65 else "rollback"
        say(f"begin {kind}")
        try:
            if kind == "promote":
                promote(uri, name, logged_run(uri, rng.randrange(10**9)), lease_seconds=lease)
                dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root, keep=4)
            else:
                dep.rollback(root, uri=uri, name=name, alias="champion", lease_seconds=lease)
        except (LookupError, TimeoutError) as err:  # nothing to roll back to; a lease that ran out: nothing written
            print("skip", type(err).__name__, str(err)[:80], file=sys.stderr, flush=True)
        say("op")


say("up")
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        work(random.Random(int(line)))
    say(f"pid {pid}")
    _, status = os.waitpid(pid, 0)
    say(f"exit {os.waitstatus_to_exitcode(status)}")
"""


class _Lines:
    """Lines of a pipe, with a deadline."""

    def __init__(self, pipe):
        self.fd, self.buf = pipe.fileno(), b""
        self.seen = []

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no line within {timeout} s")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise EOFError("the worker's output ended")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        self.seen.append(line.decode())
        return line.decode()


def test_sigkill_at_random_points_of_promote_deploy_and_rollback(uri, tmp_path):
    name, root = f"chaos-{uuid.uuid4().hex[:8]}", tmp_path / "deploy"
    rng = random.Random(1)
    assert promote(uri, name, logged_run(uri, 0)).promoted
    dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root)
    log = tmp_path / "worker.log"
    # a killed holder's lease lapses after 2 s (the next promoter takes over); the worker is forked
    # from one process that imported everything once, so a trial costs no start-up
    zygote = _spawn(ZYGOTE, uri, name, root, 2.0, log=log)
    lines = _Lines(zygote.stdout)
    trials, repaired, ops, began, killed_in = 30, 0, 0, [], []
    try:
        assert lines.next(120) == "up", _tail(log)
        for trial in range(trials):
            zygote.stdin.write(f"{trial}\n")
            zygote.stdin.flush()
            while (line := lines.next(30)).startswith("begin"):  # the child may speak before its parent
                began.append(line.split()[1])
            assert line.startswith("pid"), lines.seen[-20:]
            pid = int(line.split()[1])
            if trial % 3 == 0:  # every third trial lets one operation finish first, so the sequence moves on
                while (line := lines.next(120)) != "op":
                    assert line.startswith("begin"), repr(line)
                    began.append(line.split()[1])
                ops += 1
            time.sleep(rng.uniform(0.0, 2.5))
            os.kill(pid, signal.SIGKILL)
            while (line := lines.next(60)).split()[0] in ("op", "begin"):
                if line == "op":
                    ops += 1
                else:
                    began.append(line.split()[1])
            if len(began) > len(killed_in) + ops:  # the kill landed inside the last operation begun
                killed_in.append(began[-1])
            assert line == f"exit {-signal.SIGKILL}", (line, _tail(log))  # it was working, not dead of an error
            cur = dep.current(root)
            assert cur is not None, f"trial {trial}: current must always point at a bundle"
            cur.verify()
            dep.check_loads(cur)
            assert {dep.Bundle(b).manifest["registered_model"] for b in dep.bundles(root)} == {name}
            champion = alias_version(uri, name, "champion")
            if (cur.manifest["run_id"], cur.manifest["version"]) != (champion.run_id, str(champion.version)):
                repaired += 1  # killed between the registry write and the switch: the next run's deploy repairs it
                cur = dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root)
                cur.verify()
                assert dep.current(root).path == cur.path
                assert (cur.manifest["run_id"], cur.manifest["version"]) == (champion.run_id, str(champion.version))
    finally:
        zygote.kill()
        zygote.wait()
    print(f"chaos: {trials} kills ({killed_in.count('promote')} during promote + deploy, "
          f"{killed_in.count('rollback')} during rollback, the rest between operations), {ops} operations "
          f"completed ({began.count('rollback')} rollbacks begun), {repaired} repaired by the next deploy")
    assert ops >= trials // 3 and {"promote", "rollback"} <= set(killed_in)
