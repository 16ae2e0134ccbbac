"""Detection's training side: reviewkd.detection (data, detectors, ReviewKD over FPN levels, its
engine) behind TrainingTask."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from deploy.tasks import DETECTION, TASKS, TaskSpec
from reviewkd.config import Config
from reviewkd.detection import engine
from reviewkd.detection.engine import DetectionData
from reviewkd.detection.models import Detector
from reviewkd.runtime import Runtime


class DetectionTask:
    """Object detection: COCO/YOLO/embedded digits data, torchvision detectors, ReviewKD over their
    FPN levels beside the detectors' own losses, COCO mAP."""

    @property
    def spec(self) -> TaskSpec:
        return TASKS[DETECTION]

    def build_data(self, config: Config) -> DetectionData:
        return engine.build_detection_data(config)

    def create_model(
        self, config: Config, arch: str, num_classes: int, weights: str | os.PathLike[str] | None = None
    ) -> nn.Module:
        return engine.create_detector(config, arch, num_classes, weights)

    def train_teacher(self, config: Config, out_dir: str | os.PathLike[str], *, resume: bool = False) -> Path:
        return engine.train_detection_teacher(config, out_dir, resume=resume)

    def distill(self, config: Config, out_dir: str | os.PathLike[str], *, resume: bool = False) -> Path:
        return engine.distill_detector(config, out_dir, resume=resume)

    def evaluate(self, model: nn.Module, data: Any, runtime: Runtime) -> dict[str, float]:
        if not isinstance(model, Detector) or not isinstance(data, DetectionData):
            raise TypeError("DetectionTask.evaluate takes a Detector and DetectionData")
        return engine.evaluate_detector(model, data.val, runtime)
