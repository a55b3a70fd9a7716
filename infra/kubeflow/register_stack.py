"""Register the ZenML stack `edgeopt_kubeflow` and make it the active one (infra/kubeflow/README.md).

Run it from the checkout, logged in to a deployed ZenML server (`zenml login https://...`), in a venv
with the kubeflow extra and ZenML's s3 integration (`pip install -e ".[kubeflow]"`,
`zenml integration install s3`). Settings come from the environment:

    KUBEFLOW_HOST          Kubeflow Pipelines API, e.g. https://kubeflow.example.com/pipeline
    KUBEFLOW_NAMESPACE     optional (default: kubeflow)
    ARTIFACT_STORE_URI     s3://bucket/edgeopt (AWS S3 or MinIO)
    S3_ENDPOINT_URL        optional, MinIO's endpoint, e.g. http://minio.minio.svc.cluster.local:9000
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   kept in the ZenML secret `edgeopt_s3`
    REGISTRY_URI           the container registry the cluster pulls from, e.g. ghcr.io/acme/edgeopt

Images are built by this machine's Docker daemon (the `local` image builder) and pushed to
REGISTRY_URI. (The S3 credentials go through the Python client: in ZenML 0.98 the CLI takes
`--secret` for attaching secrets, so `zenml artifact-store register --secret=...` cannot set the
store's own `secret` field.)
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from zenml.client import Client  # noqa: E402
from zenml.enums import StackComponentType as T  # noqa: E402

from edgeopt_zenml.pipelines.runner import use_checkout_as_source_root  # noqa: E402


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        sys.exit(f"register_stack: set {name} (see the docstring of {Path(__file__).name})")
    return value


def main() -> None:
    settings = {name: env(name) for name in ("KUBEFLOW_HOST", "ARTIFACT_STORE_URI", "AWS_ACCESS_KEY_ID",
                                             "AWS_SECRET_ACCESS_KEY", "REGISTRY_URI")}
    use_checkout_as_source_root()
    client = Client()
    client.create_flavor(source="infra.kubeflow.orchestrator.EdgeoptKubeflowOrchestratorFlavor",
                         component_type=T.ORCHESTRATOR)
    client.create_secret("edgeopt_s3", values={"aws_access_key_id": settings["AWS_ACCESS_KEY_ID"],
                                               "aws_secret_access_key": settings["AWS_SECRET_ACCESS_KEY"]})
    s3 = {"path": settings["ARTIFACT_STORE_URI"], "key": "{{edgeopt_s3.aws_access_key_id}}",
          "secret": "{{edgeopt_s3.aws_secret_access_key}}"}
    if os.environ.get("S3_ENDPOINT_URL"):
        s3["client_kwargs"] = {"endpoint_url": os.environ["S3_ENDPOINT_URL"]}
    client.create_stack_component("edgeopt_s3", flavor="s3", component_type=T.ARTIFACT_STORE, configuration=s3)
    client.create_stack_component("edgeopt_registry", flavor="default", component_type=T.CONTAINER_REGISTRY,
                                  configuration={"uri": settings["REGISTRY_URI"]})
    client.create_stack_component("edgeopt_builder", flavor="local", component_type=T.IMAGE_BUILDER,
                                  configuration={})
    client.create_stack_component("edgeopt_kfp", flavor="edgeopt_kubeflow", component_type=T.ORCHESTRATOR,
                                  configuration={"kubeflow_hostname": settings["KUBEFLOW_HOST"],
                                                 "kubeflow_namespace": os.environ.get("KUBEFLOW_NAMESPACE",
                                                                                      "kubeflow")})
    client.create_stack("edgeopt_kubeflow", components={
        T.ORCHESTRATOR: "edgeopt_kfp", T.ARTIFACT_STORE: "edgeopt_s3", T.CONTAINER_REGISTRY: "edgeopt_registry",
        T.IMAGE_BUILDER: "edgeopt_builder",
    })
    client.activate_stack("edgeopt_kubeflow")
    print("registered and activated the ZenML stack 'edgeopt_kubeflow' (`zenml stack describe` shows it)")


if __name__ == "__main__":
    main()
