"""The compress pipeline compiles to a Kubeflow pipeline spec, without a cluster.

ZenML's own submission path on a Kubeflow stack (infra/kubeflow/): the edgeopt_kubeflow flavor,
the run config infra/kubeflow/run_config.yaml, a pipeline snapshot, then the orchestrator compiles
the KFP spec and tries to upload it. The upload goes to a closed loopback port and fails, which ZenML
reports as a warning; the compiled spec stays on disk. The stack validation (a remote artifact store,
an image builder) is skipped and the image is a named parent image (no Docker here).
"""

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from zenml.client import Client
from zenml.config import DockerSettings
from zenml.config.resource_settings import ResourceSettings
from zenml.enums import StackComponentType

from edgeopt.config import PROJECT_ROOT
from edgeopt_zenml.pipelines.compress import compress
from edgeopt_zenml.pipelines.runner import use_checkout_as_source_root
from infra.kubeflow.orchestrator import k8s_memory

pytestmark = pytest.mark.slow  # a registered stack and a full KFP compile (docs/tests.md: the inner loop skips them)

RUN_CONFIG = PROJECT_ROOT / "infra" / "kubeflow" / "run_config.yaml"
FLAVOR_SOURCE = "infra.kubeflow.orchestrator.EdgeoptKubeflowOrchestratorFlavor"


@pytest.fixture(scope="module")
def spec(tiny_raw):
    """The compiled KFP spec (IR YAML) of the compress pipeline on the tiny config."""
    use_checkout_as_source_root()
    client = Client()
    previous_stack = client.active_stack_model.id
    suffix = uuid.uuid4().hex[:8]
    client.create_flavor(source=FLAVOR_SOURCE, component_type=StackComponentType.ORCHESTRATOR)
    orchestrator = client.create_stack_component(
        name=f"kfp-{suffix}", flavor="edgeopt_kubeflow", component_type=StackComponentType.ORCHESTRATOR,
        configuration={"kubeflow_hostname": "http://127.0.0.1:9/pipeline"},
    )
    registry = client.create_stack_component(
        name=f"registry-{suffix}", flavor="default", component_type=StackComponentType.CONTAINER_REGISTRY,
        configuration={"uri": "registry.invalid/edgeopt"},
    )
    artifact_store = client.active_stack_model.components[StackComponentType.ARTIFACT_STORE][0].id
    client.create_stack(name=f"kubeflow-{suffix}", components={
        StackComponentType.ORCHESTRATOR: orchestrator.id, StackComponentType.ARTIFACT_STORE: artifact_store,
        StackComponentType.CONTAINER_REGISTRY: registry.id,
    })
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ZENML_SKIP_STACK_VALIDATION", "true")
        client.activate_stack(f"kubeflow-{suffix}")
        try:
            p = compress.with_options(config_path=str(RUN_CONFIG), settings={"docker": DockerSettings(
                skip_build=True, parent_image="python:3.11-slim", allow_download_from_artifact_store=False)})
            p.prepare(config=tiny_raw)
            snapshot = p.create_snapshot(name=f"kubeflow-compile-{suffix}")
            stack = client.active_stack
            # kfp calls inspect.stack() for every setting of every task: under pytest's deep stack the
            # compilation took a minute here, on a fresh thread's shallow stack the fixture takes ~12 s
            with ThreadPoolExecutor(max_workers=1) as thread:
                thread.submit(stack.submit_pipeline, snapshot=snapshot).result()
            compiled = sorted(Path(stack.orchestrator.pipeline_directory).glob("*.yaml"))
        finally:
            client.activate_stack(previous_stack)
    assert len(compiled) == 1, compiled
    return yaml.safe_load(compiled[0].read_text())


def _tasks(spec):
    """step name -> (KFP task, the step names it waits for)."""
    tasks = spec["root"]["dag"]["tasks"]
    name = {key: t["taskInfo"]["name"] for key, t in tasks.items()}
    return {name[key]: (t, {name[d] for d in t.get("dependentTasks", [])}) for key, t in tasks.items()}


def _ancestors(tasks, name):
    seen, todo = set(), [name]
    while todo:
        for dep in tasks[todo.pop()][1] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def _container(spec, task):
    executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return spec["deploymentSpec"]["executors"][executor]["container"]


def test_variant_steps_are_parallel_branches(spec):
    tasks = _tasks(spec)
    upstream = {"load_data", "train_teacher", "distill_student"}
    variants = _ancestors(tasks, "evaluate") - upstream
    assert {"export_student_onnx", "export_student_p50_onnx", "quantize_student_onnx_int8",
            "quantize_student_p50_openvino_int8"} <= variants
    for name in variants:
        deps = tasks[name][1]
        assert deps <= upstream | variants, (name, deps)
        # one parent at most, and only the recipe it extends: quantize_student_p50_onnx_int8 <- export_student_p50_onnx
        # <- shrink_student_p50; never a sibling variant (export_student_onnx and export_student_p50_onnx run side by side)
        assert len(deps & variants) <= 1, (name, deps)
        for parent in deps & variants:
            assert name.split("_", 1)[1].startswith(parent.split("_", 1)[1] + "_"), (name, parent)
    assert tasks["export_student_onnx"][1] == {"load_data", "distill_student"}
    assert "export_student_onnx" not in tasks["export_student_p50_onnx"][1]
    assert "export_student_p50_onnx" not in tasks["export_student_onnx"][1]
    assert tasks["quantize_student_p50_onnx_int8"][1] == {"load_data", "export_student_p50_onnx"}
    # evaluate is where the branches join: it waits for every exported and quantized model
    assert {n for n in variants if n.startswith(("export_", "quantize_"))} <= tasks["evaluate"][1]


def test_resource_settings_reach_the_pods(spec):
    run_config = yaml.safe_load(RUN_CONFIG.read_text())
    tasks = _tasks(spec)
    for step, settings in [("train_teacher", run_config["steps"]["train_teacher"]["settings"]["resources"]),
                           ("distill_student", run_config["steps"]["distill_student"]["settings"]["resources"]),
                           ("export_student_p50_onnx", run_config["settings"]["resources"]),
                           ("quantize_student_onnx_int8", run_config["settings"]["resources"])]:
        r = _container(spec, tasks[step][0])["resources"]
        cpu, memory = float(settings["cpu_count"]), k8s_memory(ResourceSettings(memory=settings["memory"]))
        assert float(r["resourceCpuLimit"]) == float(r["resourceCpuRequest"]) == cpu, (step, r)
        assert r["resourceMemoryLimit"] == r["resourceMemoryRequest"] == memory, (step, r)
    # training gets more than a variant branch
    container = _container(spec, tasks["train_teacher"][0])
    assert float(container["resources"]["resourceCpuLimit"]) > float(
        _container(spec, tasks["export_student_onnx"][0])["resources"]["resourceCpuLimit"])
    assert container["image"] == "python:3.11-slim"
    assert container["args"][container["args"].index("--step_name") + 1] == "train_teacher"


@pytest.mark.parametrize("memory,quantity", [("8GB", "8G"), ("512MiB", "512Mi"), ("64KB", "64k"), ("3GiB", "3Gi")])
def test_memory_settings_become_kubernetes_quantities(memory, quantity):
    assert k8s_memory(ResourceSettings(memory=memory)) == quantity
