from typing import Annotated, Optional

from zenml import step

from edgeopt.artifacts import Checkpoint, Dataset
from edgeopt.config import StudentConfig, TeacherConfig
from edgeopt.train.fit import distill_student as _distill
from edgeopt.train.teacher import train_teacher as _train
from edgeopt_zenml.materializers import CheckpointMaterializer


@step(output_materializers=CheckpointMaterializer)
def train_teacher(dataset: Dataset, teacher: dict, seed: int,
                  source_sha256: Optional[str] = None) -> Annotated[Checkpoint, "teacher"]:
    """Train the teacher from scratch, or load the model the config brings (state dict or ONNX file).

    Cached: a re-run with the same data, config and teacher file (``source_sha256``) reuses it."""
    return _train(dataset, TeacherConfig.model_validate(teacher), seed)


@step(output_materializers=CheckpointMaterializer)
def distill_student(dataset: Dataset, teacher: Checkpoint, student: dict, seed: int,
                    source_sha256: Optional[str] = None) -> Annotated[Checkpoint, "student"]:
    """Train the student with knowledge distillation from the teacher (cached; ``source_sha256``: the
    student's starting weights file, so a new file at the same path trains again)."""
    return _distill(dataset, teacher, StudentConfig.model_validate(student), seed)
