"""The bootstrap's mAP equals pycocotools' on the full sample, and its interval behaves; box parity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from deploy.detection.bootstrap import map_drop, match_images, weighted_map
from deploy.detection.coco_metric import Detections as CocoDetections
from deploy.detection.coco_metric import coco_metrics
from deploy.detection.outputs import Detections
from deploy.detection.parity import box_parity
from deploy.errors import UsageError

CLASSES = 4


@dataclass(frozen=True)
class Truth:
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray


def _scene(seed: int, images: int, noise: float, crowd_rate: float) -> tuple[list[Truth], list[Detections]]:
    """Random boxes, and detections near them (some of a wrong class, some scattered)."""
    rng = np.random.default_rng(seed)
    truths, found = [], []
    for _ in range(images):
        count = int(rng.integers(0, 5))
        corner = rng.uniform(0, 60, (count, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(5, 30, (count, 2))], axis=1)
        labels = rng.integers(0, CLASSES, count)
        truths.append(Truth(boxes, labels, rng.random(count) < crowd_rate))
        dets = int(rng.integers(0, 8))
        pick = rng.integers(0, max(count, 1), dets)
        det_boxes = boxes[pick] + rng.normal(0, noise, (dets, 4)) if count else rng.uniform(0, 60, (dets, 4))
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)
        det_labels = labels[pick] if count else rng.integers(0, CLASSES, dets)
        det_labels = np.where(rng.random(dets) < 0.2, rng.integers(0, CLASSES, dets), det_labels)
        scores = rng.random(dets).astype(np.float32)
        found.append(Detections(det_boxes.astype(np.float32), scores, det_labels))
    return truths, found


@pytest.mark.parametrize(("seed", "noise", "crowd_rate"), [(0, 3.0, 0.15), (1, 0.5, 0.0), (2, 1.5, 0.3)])
def test_the_full_sample_gives_pycocotools_map(seed: int, noise: float, crowd_rate: float) -> None:
    truths, found = _scene(seed, 60, noise, crowd_rate)
    coco = coco_metrics(truths, [CocoDetections(f.boxes, f.scores, f.classes) for f in found], CLASSES)
    assert coco.map > 0.02
    matches = match_images(truths, found, CLASSES)
    assert weighted_map(matches, np.ones((1, 60)))[0] == pytest.approx(coco.map, abs=1e-12)


def test_a_sample_drawing_an_image_twice_counts_its_boxes_twice() -> None:
    truths, found = _scene(1, 20, 0.5, 0.0)
    weights = np.random.default_rng(5).integers(0, 3, 20)
    repeated = [i for i, w in enumerate(weights) for _ in range(w)]
    matches = match_images([truths[i] for i in repeated], [found[i] for i in repeated], CLASSES)
    expected = weighted_map(matches, np.ones((1, len(repeated))))[0]
    weighted = weighted_map(match_images(truths, found, CLASSES), weights[None])[0]
    assert weighted == pytest.approx(expected, abs=1e-12)


def test_the_drop_of_a_file_against_itself_is_exactly_zero_and_a_worse_one_drops() -> None:
    truths, found = _scene(1, 80, 0.5, 0.0)
    same = match_images(truths, found, CLASSES)
    assert map_drop(same, same, samples=200).as_dict()["map_drop_interval"] == [0.0, 0.0]
    # the candidate loses every second image's detections: a drop whose interval excludes 0
    none = [Detections(f.boxes[:0], f.scores[:0], f.classes[:0]) for f in found]
    worse = [f if i % 2 else none[i] for i, f in enumerate(found)]
    drop = map_drop(same, match_images(truths, worse, CLASSES), samples=200)
    assert drop.drop > 5 and 0 < drop.low <= drop.drop <= drop.high


def test_box_parity_matches_by_class_iou_and_score() -> None:
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 30, 30]], np.float32)
    reference = [Detections(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 1, 2]))]
    shifted = boxes.copy()
    shifted[1] += 1.0  # IoU about 0.9: not a match at 0.99
    candidate = [Detections(shifted, np.array([0.9, 0.8, 0.7005], np.float32), np.array([0, 1, 1]))]
    parity = box_parity(reference, candidate)
    # box 0 matches; box 1 moved; box 2 changed class (its score differs by 5e-4, within 1e-3)
    assert (parity.matched, parity.reference, parity.candidate) == (1, 3, 3)
    assert not parity.passes()
    assert box_parity(reference, reference).passes()
    with pytest.raises(UsageError, match="1 reference images against 0"):
        box_parity(reference, [])
