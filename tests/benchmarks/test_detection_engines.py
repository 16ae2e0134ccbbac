"""A detection engine through deploy's runner contract, as validate and bench run it: the four
outputs read by name, batches cut to the engine's profile and padded to its smallest batch."""

from __future__ import annotations

import numpy as np

from benchmarks.detection import RunnerDetections
from deploy.runners.base import Runner


class _ProfiledDetector(Runner):
    """A stand-in engine with the batch profile 2..3: each image's one detection is its index in the
    images it was given (its box's x1), score 0.9, class 1; padding rows are zero images."""

    backend, precision, device = "tensorrt", "fp32", "cuda"
    input_shape = (3, 4, 4)
    min_batch, max_batch = 2, 3

    def __init__(self) -> None:
        self.batches: list[int] = []

    def _infer(self, images: np.ndarray) -> np.ndarray:
        raise AssertionError("a detector is read through infer_outputs")

    def _infer_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.batches.append(len(images))
        count = len(images)
        boxes = np.zeros((count, 2, 4), np.float32)
        x1 = images[:, 0, 0, 0]
        boxes[:, 0] = np.stack([x1, np.zeros(count), x1 + 1, np.ones(count)], 1)
        return {
            "num_detections": np.ones((count, 1), np.int32),
            "detection_boxes": boxes,
            "detection_scores": np.tile(np.array([[0.9, 0.0]], np.float32), (count, 1)),
            "detection_classes": np.ones((count, 2), np.int32),
        }

    def close(self) -> None:
        pass


def test_a_detection_engine_runs_every_batch_within_its_profile() -> None:
    runner = _ProfiledDetector()
    images = np.zeros((6, 3, 4, 4), np.float32)
    images[:, 0, 0, 0] = np.arange(6)
    found = RunnerDetections(runner, num_classes=2).detect(images[:5])
    assert runner.batches == [3, 2]  # cut to the largest batch, the rest run as they are
    assert [float(one.boxes[0, 0]) for one in found] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(one.classes.tolist() == [1] for one in found)
    single = RunnerDetections(runner, num_classes=2).detect(images[5:])
    assert runner.batches[-1] == 2 and len(single) == 1  # padded to the smallest, the padding dropped
    assert float(single[0].boxes[0, 0]) == 5.0
