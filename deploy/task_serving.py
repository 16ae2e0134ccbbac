"""What the edge commands need of each task, beside its names in deploy.tasks: what `reviewkd predict`
runs and prints for a model of the task, and the outputs of its deployable files, which `reviewkd
triton` declares.

SERVING maps every name of deploy.tasks.TASKS to its `TaskServing` (a test holds the key sets equal);
a command reads the run's manifest, looks the task up once with `serving_of`, and calls it. This sits
above deploy.tasks, deploy.manifest and deploy.predict, which deploy.tasks itself cannot import
(deploy.manifest reads the tasks' metric names from it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deploy.detection.outputs import (
    DETECTION_BOXES,
    DETECTION_CLASSES,
    DETECTION_SCORES,
    NUM_DETECTIONS,
    check_output_names,
)
from deploy.detection.predict import DetectionPredictor
from deploy.errors import UsageError
from deploy.manifest import detection_settings, model_block
from deploy.predict import ClassificationPredictor, TaskPredictor
from deploy.tasks import CLASSIFICATION, DETECTION, task_of


@dataclass(frozen=True)
class ModelOutput:
    """One output of a task's deployable file, as a server declares it: its name, numpy dtype name
    ("float32", "int32"), dimensions without the batch, and whether it holds one value per class in
    the manifest's class order (so that a labels file names its entries)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    per_class: bool = False


# (manifest, the file's output names, the file for messages) -> the file's outputs as served.
OutputsOf = Callable[[Mapping[str, Any], Sequence[str], str], tuple[ModelOutput, ...]]


def classification_outputs(
    manifest: Mapping[str, Any], names: Sequence[str], source: str
) -> tuple[ModelOutput, ...]:
    """A classifier's one output: its logits ("logits", or the file's only output), one per class."""
    if "logits" in names:
        name = "logits"
    elif len(names) == 1:
        name = names[0]
    else:
        raise UsageError(f"{source}: several outputs ({', '.join(names)}) and none is named 'logits'")
    count = len(manifest.get("classes") or []) or model_block(manifest, "student").num_classes
    if count is None:
        raise UsageError(f"{source}: neither classes nor student.num_classes gives the number of classes")
    return (ModelOutput(name, "float32", (count,), per_class=True),)


def detection_outputs(
    manifest: Mapping[str, Any], names: Sequence[str], source: str
) -> tuple[ModelOutput, ...]:
    """A detector's four outputs (deploy.detection.outputs), K = the manifest's max_detections."""
    check_output_names(list(names), source)
    top_k = detection_settings(manifest, source).max_detections
    return (
        ModelOutput(NUM_DETECTIONS, "int32", (1,)),
        ModelOutput(DETECTION_BOXES, "float32", (top_k, 4)),
        ModelOutput(DETECTION_SCORES, "float32", (top_k,)),
        ModelOutput(DETECTION_CLASSES, "int32", (top_k,)),
    )


@dataclass(frozen=True)
class TaskServing:
    """A task's edge side: `predictor` runs and shows predictions (deploy.predict.TaskPredictor);
    `outputs` describes its deployable files' outputs; `student_in_process` is whether predict's
    `--backend torch/<precision>` can run a run's PyTorch student (reviewkd.student's runner gives
    a classifier's logits; a detector's boxes come from its exported files only)."""

    predictor: TaskPredictor
    outputs: OutputsOf
    student_in_process: bool


SERVING: dict[str, TaskServing] = {
    CLASSIFICATION: TaskServing(ClassificationPredictor(), classification_outputs, student_in_process=True),
    DETECTION: TaskServing(DetectionPredictor(), detection_outputs, student_in_process=False),
}


def serving_of(manifest: Mapping[str, Any], source: str = "manifest") -> TaskServing:
    """The edge side of the task a manifest records (deploy.tasks.task_of)."""
    return SERVING[task_of(manifest, source).name]
