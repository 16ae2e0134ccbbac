"""The COCO metric by pycocotools on hand-built cases whose values are known exactly."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from deploy.detection.coco_metric import CocoMetrics, Detections, coco_metrics
from deploy.errors import MissingDependencyError, UsageError
from tests.helpers import REPO_ROOT

NUM_CLASSES = 3
# COCO's recall grid is 0, 0.01, ..., 1: a class found at half its boxes with precision 1 scores 51/101.
HALF_RECALL_AP = 51 / 101


@dataclass(frozen=True)
class Truth:
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray


def _truth(boxes: list[list[float]], labels: list[int], crowd: list[bool] | None = None) -> Truth:
    return Truth(
        np.asarray(boxes, float).reshape(-1, 4),
        np.asarray(labels),
        np.asarray(crowd or [False] * len(labels)),
    )


def _found(boxes: list[list[float]], labels: list[int], scores: list[float] | None = None) -> Detections:
    return Detections(
        np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores or [0.9] * len(labels)), np.asarray(labels)
    )


# Three images: two boxes of class 0 and one of class 1, and a negative image; class 2 never occurs.
TRUTH = [
    _truth([[0, 0, 10, 10], [20, 20, 40, 30]], [0, 0]),
    _truth([[5, 5, 25, 45]], [1]),
    _truth([], []),
]


def _perfect() -> list[Detections]:
    return [Detections(t.boxes, np.ones(len(t.labels)), t.labels) for t in TRUTH]


def _close(metrics: CocoMetrics, mean: float, ap50: float, per_class: list[float]) -> None:
    assert metrics.map == pytest.approx(mean, abs=1e-9)
    assert metrics.ap50 == pytest.approx(ap50, abs=1e-9)
    assert np.allclose(metrics.per_class_ap, per_class, equal_nan=True, atol=1e-9)


def test_perfect_detections_score_one_and_a_class_without_truth_is_nan() -> None:
    metrics = coco_metrics(TRUTH, _perfect(), NUM_CLASSES)
    _close(metrics, 1.0, 1.0, [1.0, 1.0, float("nan")])
    assert np.allclose(metrics.per_class_ap50, [1.0, 1.0, float("nan")], equal_nan=True)


def test_one_missed_box_halves_recall_of_its_class() -> None:
    found = _perfect()
    found[0] = _found([[0, 0, 10, 10]], [0])
    _close(
        coco_metrics(TRUTH, found, NUM_CLASSES),
        (HALF_RECALL_AP + 1) / 2,
        (HALF_RECALL_AP + 1) / 2,
        [HALF_RECALL_AP, 1.0, float("nan")],
    )


def test_a_wrong_class_misses_its_box_and_finds_nothing() -> None:
    found = _perfect()
    found[1] = _found([[5, 5, 25, 45]], [2])
    metrics = coco_metrics(TRUTH, found, NUM_CLASSES)
    # class 2 has no truth, so its false positive is left out of the means
    _close(metrics, 0.5, 0.5, [1.0, 0.0, float("nan")])


def test_a_loose_box_counts_at_the_iou_thresholds_it_passes() -> None:
    found = _perfect()
    found[1] = _found([[5, 5, 25, 33.8]], [1])  # IoU 28.8 / 40 = 0.72: matched at 0.50..0.70, 5 of 10
    _close(coco_metrics(TRUTH, found, NUM_CLASSES), (1.0 + 0.5) / 2, 1.0, [1.0, 0.5, float("nan")])


def test_no_detections_at_all_score_zero() -> None:
    nothing = [_found([], []) for _ in TRUTH]
    _close(coco_metrics(TRUTH, nothing, NUM_CLASSES), 0.0, 0.0, [0.0, 0.0, float("nan")])


def test_a_detection_on_a_crowd_region_costs_nothing() -> None:
    truth = [*TRUTH[:2], _truth([[0, 0, 30, 30]], [0], [True])]
    found = [*_perfect()[:2], _found([[1, 1, 29, 29]], [0], [0.99])]
    _close(coco_metrics(truth, found, NUM_CLASSES), 1.0, 1.0, [1.0, 1.0, float("nan")])


def test_pycocotools_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    coco_metrics(TRUTH, _perfect(), NUM_CLASSES)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("truth", "found", "fragment"),
    [
        (TRUTH[:2], _perfect(), "2 images of ground truth but 3 of detections"),
        (
            TRUTH,
            [*_perfect()[:2], Detections(np.zeros((1, 4)), np.zeros(2), np.zeros(1, int))],
            "image 2's detections have unequal numbers",
        ),
        (
            TRUTH,
            [*_perfect()[:2], _found([[0, 0, 1, 1]], [3])],
            "image 2's detections hold class 3; expected 0..2",
        ),
    ],
    ids=["lengths", "unequal arrays", "class out of range"],
)
def test_bad_arguments_are_one_line(truth: list[Truth], found: list[Detections], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment.replace(".", r"\.").replace("'", "'")):
        coco_metrics(truth, found, NUM_CLASSES)


def test_importing_the_metric_does_not_import_pycocotools() -> None:
    code = (
        "import sys, deploy.detection.coco_metric, deploy.detection.annotations;"
        " print('pycocotools' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    assert result.stdout.strip() == "False"


def test_without_pycocotools_it_is_exit_3_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)  # what an install without it raises
    with pytest.raises(MissingDependencyError, match=r"pip install 'reviewkd\[detection\]'") as caught:
        coco_metrics(TRUTH, _perfect(), NUM_CLASSES)
    assert caught.value.exit_code == 3
