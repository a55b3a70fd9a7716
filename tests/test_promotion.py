"""Champion vs challenger; deploy identity from the registry alone; rollback that follows the
history and lasts; the promotion lease; concurrent promotions; SIGKILL during deployment."""

import base64
import http.server
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from edgeopt.config import PromotionConfig
from edgeopt.deploy import champion as dep
from edgeopt.deploy.folder import history
from edgeopt.plan import parse_config
from edgeopt.registry import lease as registry
from edgeopt.registry.versions import alias_version
from edgeopt.select.promotion import decide
from edgeopt.track.runs import config_params
from edgeopt.track.uri import client_for, redact_uri, split_credentials, without_credentials
from tests._deploy_kit import (
    DATASET,
    LABELS,
    champion_run,
    deploy_info,
    logged_run,
    model_dir,
    promote,
    result,
    versions,
)
from tests._search import SEARCH
from tests._tiny import ROOT


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One MLflow store for the module (creating one takes seconds); each test uses its own model name."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _name() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def test_challenger_must_beat_the_champion_under_the_rule():
    rule = PromotionConfig(max_accuracy_loss=0.5, min_latency_gain_pct=5.0)
    champ = result("champion-v1:x", acc=0.98, p50=0.100)
    assert decide(result("a", acc=0.98, p50=0.090), champ, rule).promote  # 10 % faster, same accuracy
    slow = decide(result("b", acc=0.99, p50=0.098), champ, rule)  # 2 % faster only
    assert not slow.promote and "latency" in slow.reason and any("gain 2.0%" in c for c in slow.checks)
    worse = decide(result("c", acc=0.97, p50=0.05), champ, rule)  # 1 pt less accurate
    assert not worse.promote and "accuracy" in worse.reason
    assert worse.checks[0].startswith("FAIL: val accuracy 97.00% vs champion 98.00% (loss 1.00 pt")  # on validation
    assert decide(result("d"), None, rule).promote  # first champion
    assert not decide(None, champ, rule, "no variant meets the constraints").promote
    sized = decide(result("f", p50=0.05, size=0.049), champ, PromotionConfig(min_size_gain_pct=10))
    assert not sized.promote and "size" in sized.reason


def test_a_champion_that_cannot_be_re_measured_is_kept_unless_the_config_says_otherwise():
    broken = result("champion-v1:x").model_copy(update={"status": "failed", "reason": "shape mismatch"})
    kept = decide(result("e"), broken, PromotionConfig())
    assert not kept.promote and "shape mismatch" in kept.reason and "replace_unmeasured_champion" in kept.reason
    assert decide(result("e"), broken, PromotionConfig(replace_unmeasured_champion=True)).promote


def test_tracking_credentials_are_redacted():
    assert redact_uri("http://alice:s3cret@127.0.0.1:5000/x") == "http://***@127.0.0.1:5000/x"
    assert redact_uri("postgresql://u:pw@db/mlflow?sslpassword=p2&sslmode=require") == \
        "postgresql://***@db/mlflow?sslpassword=***&sslmode=require"
    assert redact_uri("sqlite:////home/a@b/mlflow.db") == "sqlite:////home/a@b/mlflow.db"
    assert redact_uri("https://mlflow.example.com") == "https://mlflow.example.com"
    params = config_params({"tracking": {"uri": "http://alice:s3cret@h:5000"},
                            "variants": {"search": {"storage": "postgresql://u:pw@db/optuna"}}})
    assert params == {"tracking.uri": "http://***@h:5000", "variants.search.storage": "postgresql://***@db/optuna"}


def test_the_pipeline_parameters_hold_no_password(tiny_raw):
    """The tracking URI's and the search storage's passwords leave the config the runner passes to ZenML;
    two PostgreSQL users cannot share libpq's variables, so the second keeps its own in its URL."""
    def cfg(tracking, storage):
        return parse_config({**tiny_raw, "tracking": {"uri": tracking},
                             "variants": {**tiny_raw["variants"], "search": {**SEARCH, "storage": storage}}})

    clean, env = without_credentials(cfg("postgresql://ml:pw1@db/mlflow", "postgresql://ml:pw1@db/optuna"))
    assert (clean.tracking.uri, clean.variants.search.storage) == ("postgresql://db/mlflow", "postgresql://db/optuna")
    assert env == {"PGUSER": "ml", "PGPASSWORD": "pw1"} and "pw1" not in json.dumps(clean.model_dump(mode="json"))
    clean, env = without_credentials(cfg("http://alice:s3cret@h:5000", "postgresql://opt:pw2@db/optuna"))
    assert (clean.tracking.uri, clean.variants.search.storage) == ("http://h:5000", "postgresql://db/optuna")
    assert env == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cret",
                   "PGUSER": "opt", "PGPASSWORD": "pw2"}
    clean, env = without_credentials(cfg("postgresql://ml:pw1@db/mlflow", "postgresql://opt:pw2@db/optuna"))
    assert clean.variants.search.storage == "postgresql://opt:pw2@db/optuna" and env["PGPASSWORD"] == "pw1"


def test_tracking_credentials_leave_the_uri_for_the_environment_and_still_authenticate(monkeypatch):
    """The runner passes the URI without user-info to the pipeline (its parameters are stored by ZenML);
    MLflow's client still sends the credentials, read from the environment."""
    assert split_credentials("sqlite:////home/a@b/mlflow.db") == ("sqlite:////home/a@b/mlflow.db", {})
    assert split_credentials("postgresql://u:p%40ss@db:5432/mlflow") == (
        "postgresql://db:5432/mlflow", {"PGUSER": "u", "PGPASSWORD": "p@ss"})
    seen = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            seen.append(self.headers.get("Authorization"))
            body = b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri, env = split_credentials(f"http://alice:s3cret@127.0.0.1:{server.server_port}")
        assert uri == f"http://127.0.0.1:{server.server_port}" and "alice" not in uri
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert client_for(uri).get_experiment_by_name("x") is None
    finally:
        server.shutdown()
    assert seen and seen[0] == "Basic " + base64.b64encode(b"alice:s3cret").decode()


# --------------------------------------------------------------------------- deploy identity, contents


@pytest.mark.slow  # several registry round trips (20-30 s)
def test_a_new_champion_is_deployed_after_the_store_is_reset_and_contents_come_from_its_own_run(tmp_path):
    root = tmp_path / "deploy"
    first_store, second_store = (f"sqlite:///{tmp_path / d / 'mlflow.db'}" for d in ("a", "b"))
    assert promote(first_store, "digits", logged_run(first_store, 1)).promoted
    old = dep.deploy_from_registry(uri=first_store, name="digits", alias="champion", root=root)
    # a fresh store (reset, or another config's registry): v1 again, but another run and another model
    other = {**DATASET, "classes": ["x", "y"], "mean": [0.1], "std": [0.9]}
    assert promote(second_store, "digits", logged_run(second_store, 2, dataset=other)).promoted
    new = dep.deploy_from_registry(uri=second_store, name="digits", alias="champion", root=root)
    assert new.manifest["version"] == old.manifest["version"] == "1"
    assert new.path != old.path and dep.current(root).path == new.path  # not "already current"
    assert new.manifest["run_id"] != old.manifest["run_id"]
    assert new.manifest["model_sha256"] != old.manifest["model_sha256"]
    # labels and preprocessing are the version's own (logged with its run), not any current run's data
    assert (new.path / "labels.json").read_text().count('"x"') == 1
    assert new.manifest["preprocessing"]["mean"] == [0.1] and old.manifest["preprocessing"]["mean"] == [0.5]
    assert dep.deploy_from_registry(uri=second_store, name="digits", alias="champion", root=root).path == new.path


# ------------------------------------------------------------------------------------------- rollback


@pytest.mark.slow  # several registry round trips (20-30 s)
def test_the_champions_own_model_is_not_registered_again(uri):
    """A cached re-run whose winner is the champion's bytes on the same runtime registers nothing,
    however the latency noise makes it compare."""
    name = _name()
    assert promote(uri, name, logged_run(uri, 20)).promoted
    again = promote(uri, name, logged_run(uri, 20))
    assert not again.promoted and "champion v1's own model" in again.reason
    assert versions(uri, name) == [1]
    assert promote(uri, name, logged_run(uri, 21)).promoted


def test_rollback_follows_the_history_blocks_the_bad_model_and_lasts(uri, tmp_path):
    name, root = _name(), tmp_path / "deploy"
    deploy = lambda: dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root)  # noqa: E731
    good, bad = logged_run(uri, 10), logged_run(uri, 11)
    assert promote(uri, name, good).promoted
    b1 = deploy()
    assert promote(uri, name, bad).promoted
    b2 = deploy()
    assert b2.manifest["version"] == "2"

    back = dep.rollback(root, uri=uri, name=name, alias="champion")
    assert back.bundle.path == b1.path and dep.current(root).path == b1.path
    assert str(alias_version(uri, name, "champion").version) == "1"
    assert back.blocked_sha256 == b2.manifest["model_sha256"] in registry.blocked(uri, name)
    assert "rolled back" in client_for(uri).get_model_version(name, "2").tags["edgeopt.rolled_back"]

    # two more scheduled runs: the same (cached) bad model wins again and is not promoted
    for _ in range(2):
        again = promote(uri, name, logged_run(uri, 11))
        assert not again.promoted and "`edgeopt unblock -c <config> --model " in again.reason
        assert deploy().path == b1.path
    assert champion_run(uri, name) == good

    # a new deploy, then rollback: back to the bundle served before it (b1), not to b2
    assert promote(uri, name, logged_run(uri, 12)).promoted
    b3 = deploy()
    again = dep.rollback(root, uri=uri, name=name, alias="champion")
    assert again.bundle.path == b1.path and dep.current(root).path == b1.path
    assert [e["event"] for e in history(root)] == ["deploy", "deploy", "rollback", "deploy", "rollback"]
    with pytest.raises(LookupError, match="no intact bundle to roll back to"):
        dep.rollback(root, uri=uri, name=name, alias="champion")  # b1 was the first; b2, b3 are blocked

    assert registry.unblock(uri, name, b2.manifest["model_sha256"][:12]) == [b2.manifest["model_sha256"]]
    assert promote(uri, name, logged_run(uri, 11)).promoted  # cleared: the model may come back
    assert b3.manifest["model_sha256"] in registry.blocked(uri, name)


def test_rollback_falls_back_to_an_older_intact_bundle(uri, tmp_path):
    name, root = _name(), tmp_path / "deploy"
    bundles = []
    for seed in (20, 21, 22):
        assert promote(uri, name, logged_run(uri, seed)).promoted
        bundles.append(dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root))
    (bundles[1].path / "model.onnx").unlink()  # the bundle served before: broken (an interrupted copy)
    back = dep.rollback(root, uri=uri, name=name, alias="champion")
    assert back.bundle.path == bundles[0].path and "model.onnx listed in the manifest is missing" in back.skipped[0]
    assert str(alias_version(uri, name, "champion").version) == "1"


def test_rollback_works_when_the_current_bundle_folder_is_gone(uri, tmp_path):
    import shutil

    name, root = _name(), tmp_path / "deploy"
    for seed in (30, 31):
        assert promote(uri, name, logged_run(uri, seed)).promoted
        cur = dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root)
    shutil.rmtree(cur.path)
    back = dep.rollback(root, uri=uri, name=name, alias="champion")
    assert back.bundle.manifest["version"] == "1" and back.blocked_sha256 == cur.manifest["model_sha256"]


# ----------------------------------------------------------------------------------------- the lease


def test_the_lease_excludes_waits_and_breaks_an_expired_holder(uri):
    name = _name()
    held = registry.Lease(uri, name, ttl=2.0).acquire()  # a holder that is then killed: never released
    with pytest.raises(registry.LeaseError, match=f"{name}: the promotion lease is held by .*gave up after 0 s"):
        registry.Lease(uri, name, wait=0.5).acquire()
    t0 = time.monotonic()
    with registry.Lease(uri, name, wait=30) as lease:  # waits for the expiry, then takes the next generation
        assert time.monotonic() - t0 >= 0.5 and lease.record.endswith("000000000002")
        lease.check()
    with pytest.raises(registry.LeaseError, match="ran out before the write"):
        held.check()
    records = [m.name for m in client_for(uri).search_registered_models(filter_string=f"name LIKE '{name}.lock.%'")]
    assert records == [f"{name}.lock.000000000002"]  # the generations below the top are cleaned up


def _promote_and_deploy(uri, name, run_id, root, barrier):
    os.environ["TMPDIR"] = str(root) + "-tmp"  # a temp dir of its own: nothing shared but the tracking URI
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    measured = str(alias_version(uri, name, "champion").version)
    barrier.wait()
    out = promote(uri, name, run_id, measured=measured)
    dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root)
    return out.promoted


@pytest.mark.slow  # spawned interpreters
def test_concurrent_promotions_leave_one_champion_and_consistent_deploy_folders(uri, tmp_path):
    name = _name()
    run_ids = [logged_run(uri, 40 + i) for i in range(5)]
    assert promote(uri, name, run_ids[0]).promoted
    roots = [tmp_path / f"host{i}" for i in range(4)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        promoted = pool.starmap(_promote_and_deploy, [(uri, name, rid, root, barrier)
                                                      for rid, root in zip(run_ids[1:], roots)])
    assert sum(promoted) == 1  # the others saw the champion move and refused
    champion = alias_version(uri, name, "champion")
    assert champion.run_id == run_ids[1 + promoted.index(True)]
    for root in roots:  # each host's folder converged on the champion the registry names
        dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root)
        cur = dep.current(root)
        cur.verify()
        assert cur.manifest["run_id"] == champion.run_id and not list((root / "versions").glob(".tmp-*"))


DEPLOY_LOOP = """
import sys
from pathlib import Path
from edgeopt.deploy import folder as dep
from tests._deploy_kit import LABELS, deploy_info, model_dir
root = Path(sys.argv[1])
i = 0
while True:
    d = model_dir(i, hidden=1000)
    dep.deploy(d.path, root, name=f"b{i}", model_files=["model.onnx"], runtime={"runtime": "onnxruntime"},
               labels=LABELS, info=deploy_info("m", str(i)), keep=3)
    print(i, flush=True)
    i += 1
"""


@pytest.mark.slow  # spawned interpreters
def test_sigkill_during_deployment_never_leaves_a_half_bundle(tmp_path):
    root = tmp_path / "deploy"
    rng = random.Random(0)
    for _ in range(12):
        p = subprocess.Popen([sys.executable, "-c", DEPLOY_LOOP, str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        p.stdout.readline()  # at least one bundle is complete
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        cur = dep.current(root)
        assert cur is not None, "current must always point at a bundle"
        cur.verify()  # every file present and listed, every sha256 right
        dep.check_loads(cur)
        assert (cur.path / "model.onnx").stat().st_size > 4_000_000
        assert any(e["to"] == cur.path.name for e in history(root))  # what is served is in the history
    final = dep.deploy(model_dir(99).path, root, name="final", model_files=["model.onnx"],
                       runtime={"runtime": "onnxruntime"}, labels=LABELS, info=deploy_info("m", "99"), keep=3)
    assert dep.current(root).path == final.path and not list((root / "versions").glob(".tmp-*"))


def test_a_rollback_cut_short_after_its_registry_writes_is_repaired_by_the_next_deploy(uri, tmp_path, monkeypatch):
    name, root = _name(), tmp_path / "deploy"
    for seed in (50, 51):
        assert promote(uri, name, logged_run(uri, seed)).promoted
        b = dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root)
    first = dep.bundles(root)[0]

    def killed(*a, **k):
        raise KeyboardInterrupt("killed between the registry writes and the switch")

    monkeypatch.setattr(dep, "switch", killed)
    with pytest.raises(KeyboardInterrupt):
        dep.rollback(root, uri=uri, name=name, alias="champion")
    monkeypatch.undo()
    assert dep.current(root).path == b.path and str(alias_version(uri, name, "champion").version) == "1"
    repaired = dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root)  # the next run's deploy step
    assert repaired.path == first and dep.current(root).path == first  # the kept bundle, switched back to
    assert history(root)[-1]["event"] == "deploy" and len(dep.bundles(root)) == 2
