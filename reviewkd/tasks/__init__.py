"""The training side of each task: what the pipeline and the commands call, looked up once by name.

deploy.tasks owns the task names and their torch-free contract (TASKS); TRAINING_TASKS maps every
one of those names to its implementation of `TrainingTask`. A caller reads the config (or a run's
manifest), looks the task up once with `training_task`, and calls it: no `if task == ...` elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from deploy.tasks import CLASSIFICATION, DETECTION, TaskSpec
from reviewkd.config import Config
from reviewkd.runtime import Runtime
from reviewkd.tasks.classification import ClassificationTask
from reviewkd.tasks.detection import DetectionTask


class TrainingTask(Protocol):
    """A task's training side. `data` is what `build_data` returns (its type is the task's own)."""

    @property
    def spec(self) -> TaskSpec:
        """The task's torch-free contract (deploy.tasks)."""
        ...

    def build_data(self, config: Config) -> Any:
        """Both splits of the configured data, ready to train on and to score."""
        ...

    def create_model(
        self, config: Config, arch: str, num_classes: int, weights: str | os.PathLike[str] | None = None
    ) -> nn.Module:
        """The model `arch` (a teacher or a student of this task), with a weights file if given."""
        ...

    def train_teacher(self, config: Config, out_dir: str | os.PathLike[str], *, resume: bool = False) -> Path:
        """Train teacher.arch alone into out_dir (reusing a finished run); return its weights file."""
        ...

    def distill(self, config: Config, out_dir: str | os.PathLike[str], *, resume: bool = False) -> Path:
        """Train student.arch with method.name (the baseline method: no teacher) into out_dir; a
        teacher without teacher.weights is trained first into out_dir/teacher/. Returns
        out_dir/student.safetensors."""
        ...

    def evaluate(self, model: nn.Module, data: Any, runtime: Runtime) -> dict[str, float]:
        """The model's metrics on the val split, in percent, under the keys of spec.model_metrics."""
        ...


TRAINING_TASKS: dict[str, TrainingTask] = {
    CLASSIFICATION: ClassificationTask(),
    DETECTION: DetectionTask(),
}


def training_task(config: Config) -> TrainingTask:
    """The training side of config.task (validated against deploy.tasks.TASKS when the config loaded)."""
    return TRAINING_TASKS[config.task]
