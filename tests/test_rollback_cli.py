"""`edgeopt rollback` and `edgeopt unblock`: the deploy folder, the MLflow alias, the block and the
ZenML model stage, as a user drives them; their errors in one line."""

import pytest
import yaml
from click.testing import CliRunner

from edgeopt.deploy import champion as dep
from edgeopt.registry import lease as registry
from edgeopt.registry.versions import alias_version
from tests._deploy_kit import logged_run, promote


def _last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.mark.slow  # CLI subprocesses over a registry (30 s)
def test_rollback_and_unblock_commands(tmp_path, tiny_raw):
    from zenml.client import Client
    from zenml.enums import MetadataResourceTypes, ModelStages
    from zenml.models import RunMetadataResource

    from edgeopt_zenml.cli import cli

    uri, name, root = f"sqlite:///{tmp_path / 'mlflow.db'}", "cli-rollback", tmp_path / "deploy"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**tiny_raw, "tracking": {"uri": uri, "experiment": "cli"},
                                      "registry": {"name": name}, "deploy": {"root": str(root), "keep": 3}}))
    zenml = Client()
    zenml.create_model(name)
    stages, bundles = [], []
    for seed in (60, 61):  # two runs, each promoting and deploying, as the promote and deploy steps do
        rid = logged_run(uri, seed)
        res = promote(uri, name, rid)
        bundles.append(dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root))
        mv = zenml.create_model_version(name)
        zenml.create_run_metadata({"promotion": {"promoted": True, "version": res.version, "run_id": rid}},
                                  [RunMetadataResource(id=mv.id, type=MetadataResourceTypes.MODEL_VERSION)])
        mv.set_stage(ModelStages.PRODUCTION, force=True)
        stages.append(mv)
    run = CliRunner().invoke(cli, ["rollback", "-c", str(config)])
    assert run.exit_code == 0, run.output
    assert f"{name}@champion -> v1" in run.output and f"ZenML model version {stages[0].name} -> production" in run.output
    assert "`edgeopt unblock -c " in run.output
    assert dep.current(root).path == bundles[0].path and str(alias_version(uri, name, "champion").version) == "1"
    assert zenml.get_model_version(name, ModelStages.PRODUCTION).id == stages[0].id
    assert zenml.get_model_version(name, stages[1].name).stage == ModelStages.ARCHIVED

    assert not promote(uri, name, logged_run(uri, 61)).promoted  # the rolled-back model, cached: refused
    run = CliRunner().invoke(cli, ["unblock", "-c", str(config), "--model", "v2"])
    assert run.exit_code == 0 and f"unblocked 1 model(s) of {name}: {bundles[1].manifest['model_sha256'][:12]}" \
        in run.output, run.output
    assert registry.blocked(uri, name) == {}
    assert promote(uri, name, logged_run(uri, 61)).promoted

    run = CliRunner().invoke(cli, ["unblock", "-c", str(config)])
    assert run.exit_code == 1 and _last_line(run) == f"edgeopt: error: {name}: nothing is blocked"
    dep.deploy_from_registry(uri=uri, name=name, alias="champion", root=root)
    other = tmp_path / "other.yaml"  # the same deploy folder, another registered model
    other.write_text(config.read_text().replace(f"name: {name}", "name: another-model"))
    run = CliRunner().invoke(cli, ["rollback", "-c", str(other)])
    assert run.exit_code == 1 and _last_line(run).startswith(
        f"edgeopt: error: {root}: holds bundles of registered model '{name}'"), run.output
