"""ZenML's Kubeflow orchestrator with working memory settings, as the flavor `edgeopt_kubeflow`.

ZenML 0.98's Kubeflow orchestrator passes `ResourceSettings.get_memory()` (a float in GB) to
kfp's `set_memory_limit`, which only takes a Kubernetes quantity string: any step with a `memory`
setting fails to compile (`TypeError: expected string or bytes-like object, got 'float'`). It also
sets only limits. This flavor hands memory over as a quantity ("8GB" -> "8G", "512MiB" -> "512Mi")
and sets the requests equal to the limits, so the scheduler reserves what a step asks for.
Everything else (compilation, upload, schedules, settings) is ZenML's.

    zenml orchestrator flavor register infra.kubeflow.orchestrator.EdgeoptKubeflowOrchestratorFlavor
    zenml orchestrator register edgeopt_kfp -f edgeopt_kubeflow --kubeflow_hostname=https://.../pipeline
"""

from __future__ import annotations

from typing import Optional, Tuple, Type

from kfp import dsl
from zenml.config.resource_settings import ByteUnit, ResourceSettings
from zenml.integrations.kubeflow.flavors import KubeflowOrchestratorFlavor
from zenml.integrations.kubeflow.orchestrators import KubeflowOrchestrator

# ZenML byte units -> Kubernetes quantity suffixes (decimal kilo is a lower-case "k" there)
_K8S_SUFFIX = {ByteUnit.B: "", ByteUnit.KB: "k", ByteUnit.KIB: "Ki", ByteUnit.MB: "M", ByteUnit.MIB: "Mi",
               ByteUnit.GB: "G", ByteUnit.GIB: "Gi", ByteUnit.TB: "T", ByteUnit.TIB: "Ti", ByteUnit.PB: "P",
               ByteUnit.PIB: "Pi"}


def k8s_memory(settings: ResourceSettings) -> Optional[str]:
    """The memory setting as a Kubernetes quantity, or None when the step sets none."""
    parsed = settings.memory_quantity_and_unit()
    if parsed is None:
        return None
    quantity, unit = parsed
    return f"{quantity}{_K8S_SUFFIX[unit]}"


class EdgeoptKubeflowOrchestrator(KubeflowOrchestrator):
    def _configure_container_resources(
        self,
        dynamic_component: dsl.PipelineTask,
        resource_settings: ResourceSettings,
        node_selector_constraint: Optional[Tuple[str, str]] = None,
    ) -> dsl.PipelineTask:
        task = super()._configure_container_resources(
            dynamic_component, resource_settings.model_copy(update={"memory": None}), node_selector_constraint
        )
        if resource_settings.cpu_count:
            task = task.set_cpu_request(str(resource_settings.cpu_count))
        memory = k8s_memory(resource_settings)
        if memory:
            task = task.set_memory_request(memory).set_memory_limit(memory)
        return task


class EdgeoptKubeflowOrchestratorFlavor(KubeflowOrchestratorFlavor):
    @property
    def name(self) -> str:
        return "edgeopt_kubeflow"

    @property
    def implementation_class(self) -> Type[EdgeoptKubeflowOrchestrator]:
        return EdgeoptKubeflowOrchestrator
