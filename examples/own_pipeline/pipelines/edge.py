"""Our training step, then edgeopt's: export to ONNX, quantize to INT8, measure both against the FP32
model and the current champion, select, track in MLflow, promote and deploy the winner."""

from steps import train_classifier
from zenml import Model, pipeline

from edgeopt.config import PromotionConfig, QuantConfig, TargetConfig
from edgeopt_zenml.steps import deploy, evaluate, export, load_data, promote, quantize, select, track

FP32, INT8, RUNTIME = "teacher-fp32-onnx", "teacher-int8-onnx", "onnxruntime"
REGISTERED_MODEL = "own-digits"  # the MLflow registered model and the ZenML model (promote sets its stage)


@pipeline(model=Model(name=REGISTERED_MODEL, description="our digits classifier, compressed by edgeopt"))
def edge_pipeline(tracking_uri: str, deploy_root: str, epochs: int = 3, seed: int = 0) -> None:
    target = TargetConfig(warmup=5, iterations=50, constraints={"max_accuracy_drop": 5.0})
    dataset = load_data(data={"source": "digits"}, seed=seed)
    trained = train_classifier(dataset, epochs=epochs, lr=0.01, seed=seed)
    fp32 = export(trained, dataset, fmt="onnx", variant=FP32)
    int8 = quantize(fp32, dataset, scheme="int8", quant=QuantConfig(calibration_samples=64).model_dump(mode="json"),
                    seed=seed, variant=INT8)
    evaluation = evaluate([fp32, int8], dataset, evaluations={FP32: [RUNTIME], INT8: [RUNTIME]},
                          reference=f"{FP32}@{RUNTIME}", target=target.model_dump(mode="json"),
                          tracking_uri=tracking_uri, registered_model=REGISTERED_MODEL, alias="champion")
    selection, decision, report, plot, _ = select(
        evaluation, constraints=target.constraints.model_dump(mode="json"), objective="latency",
        promotion=PromotionConfig().model_dump(mode="json"),
    )
    runs = track(evaluation, selection, decision, report, plot, [fp32, int8], dataset,
                 config={"epochs": epochs, "seed": seed}, tracking_uri=tracking_uri, experiment="own-pipeline")
    promotion = promote(evaluation, selection, decision, runs, tracking_uri=tracking_uri,
                        registered_model=REGISTERED_MODEL, alias="champion")
    deploy(promotion, tracking_uri=tracking_uri, registered_model=REGISTERED_MODEL, alias="champion",
           root=deploy_root, keep=2)
