"""Classification's training side: the existing engine (reviewkd.engine) and data, behind TrainingTask."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from deploy.tasks import CLASSIFICATION, TASKS, TaskSpec
from reviewkd import engine
from reviewkd.config import Config
from reviewkd.data import DataBundle, build_data
from reviewkd.models import create_model
from reviewkd.runtime import Runtime


class ClassificationTask:
    """Image classification: class folders and friends, zoo classifiers, CE/KD/ReviewKD, top-1."""

    @property
    def spec(self) -> TaskSpec:
        return TASKS[CLASSIFICATION]

    def build_data(self, config: Config) -> DataBundle:
        return build_data(config)

    def create_model(
        self, config: Config, arch: str, num_classes: int, weights: str | os.PathLike[str] | None = None
    ) -> nn.Module:
        return create_model(arch, num_classes, weights=weights)

    def train_teacher(self, config: Config, out_dir: str | os.PathLike[str], *, resume: bool = False) -> Path:
        return engine.train_teacher(config, out_dir, resume=resume)

    def distill(self, config: Config, out_dir: str | os.PathLike[str], *, resume: bool = False) -> Path:
        return engine.distill(config, out_dir, resume=resume)

    def evaluate(self, model: nn.Module, data: Any, runtime: Runtime) -> dict[str, float]:
        return engine.evaluate(model, data, runtime)
