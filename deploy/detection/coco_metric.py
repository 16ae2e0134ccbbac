"""COCO box mAP@[.5:.95], AP50 and per-class AP, computed by pycocotools (the reference implementation).

pycocotools is an optional dependency (the `detection` extra): it is imported only inside
`coco_metrics`, so the edge install's cold start does not pay for it, and its absence is a
MissingDependencyError naming the install. It needs numpy alone (matplotlib only for its
`showAnns`, which is never called here).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from deploy.errors import UsageError
from deploy.optional import optional_import

# COCO's limit of detections per image for its headline numbers.
MAX_DETECTIONS = 100
# COCOeval's recall points: 0, 0.01, ..., 1.
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


class GroundTruth(Protocol):
    """One image's true boxes: (N, 4) x1, y1, x2, y2 pixels and (N,) class indices; `crowd` (N,) bool
    marks COCO crowd regions (matches to them neither count nor hurt). ImageAnnotation is one."""

    @property
    def boxes(self) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def crowd(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Detections:
    """One image's detections: (M, 4) x1, y1, x2, y2 pixels, (M,) scores and (M,) class indices."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class CocoMetrics:
    """COCO's box metrics over all images, as fractions (0-1).

    `map` is AP averaged over IoU 0.50:0.05:0.95 and the classes, `ap50` the same at IoU 0.5 alone.
    `per_class_ap` and `per_class_ap50` hold one value per class index, NaN for a class with no
    (non-crowd) ground truth, which COCO leaves out of the means. Both means are NaN when no class
    has ground truth. `precision` is COCOeval's precision array at area "all" and the largest
    max-detections setting: [IoU threshold (0.50:0.05:0.95), recall point (RECALL_POINTS), class],
    -1 where a class has no ground truth (`pr_curves` reads it).
    """

    map: float
    ap50: float
    per_class_ap: tuple[float, ...]
    per_class_ap50: tuple[float, ...]
    precision: np.ndarray


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _check_image(index: int, truth: GroundTruth, found: Detections, num_classes: int) -> None:
    where = f"image {index}"
    count = len(truth.labels)
    if np.asarray(truth.boxes).reshape(-1, 4).shape[0] != count or len(truth.crowd) != count:
        raise UsageError(
            f"coco_metrics: {where}'s ground truth has unequal numbers of boxes, labels and crowd flags"
        )
    if not (np.asarray(found.boxes).reshape(-1, 4).shape[0] == len(found.scores) == len(found.labels)):
        raise UsageError(
            f"coco_metrics: {where}'s detections have unequal numbers of boxes, scores and labels"
        )
    for kind, labels in (("ground truth", truth.labels), ("detections", found.labels)):
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise UsageError(
                f"coco_metrics: {where}'s {kind} hold class {labels.max()}; expected 0..{num_classes - 1}"
            )


def _class_mean(precision: np.ndarray) -> float:
    """COCOeval.summarize's mean: over the entries > -1 (-1 marks a class without ground truth)."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else float("nan")


def _annotation(annotation_id: int, image_id: int, box: np.ndarray, label: Any) -> dict[str, Any]:
    """One COCO annotation record of an x, y, w, h box (ground truth or detection alike)."""
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": int(label),
        "bbox": box.tolist(),
        "area": float(box[2] * box[3]),
    }


def coco_metrics(
    ground_truth: Sequence[GroundTruth],
    detections: Sequence[Detections],
    num_classes: int,
    max_detections: int = MAX_DETECTIONS,
) -> CocoMetrics:
    """Score `detections` against `ground_truth` (the same images, in the same order) with COCOeval.

    An image may have no boxes and no detections; no detections at all scores 0 for every class
    with ground truth (pycocotools' own `loadRes` refuses an empty list, so both sides are built
    here as COCO objects directly). pycocotools' progress prints are silenced.

    Raises:
        UsageError: the lists differ in length, an image's arrays differ in length, or a label is
            outside 0..num_classes-1.
        MissingDependencyError: pycocotools is not installed.
    """
    if len(ground_truth) != len(detections):
        raise UsageError(
            f"coco_metrics: {len(ground_truth)} images of ground truth but {len(detections)} of detections"
        )
    with optional_import("the COCO detection metric"):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

    images: list[dict[str, Any]] = []
    truth_annotations: list[dict[str, Any]] = []
    found_annotations: list[dict[str, Any]] = []
    for index, (truth, found) in enumerate(zip(ground_truth, detections, strict=True)):
        _check_image(index, truth, found, num_classes)
        image_id = index + 1
        images.append({"id": image_id})
        for box, label, crowd in zip(
            _xywh(truth.boxes), np.asarray(truth.labels), np.asarray(truth.crowd), strict=True
        ):
            annotation = _annotation(len(truth_annotations) + 1, image_id, box, label)
            truth_annotations.append({**annotation, "iscrowd": int(bool(crowd))})
        for box, score, label in zip(
            _xywh(found.boxes), np.asarray(found.scores), np.asarray(found.labels), strict=True
        ):
            annotation = _annotation(len(found_annotations) + 1, image_id, box, label)
            found_annotations.append({**annotation, "iscrowd": 0, "score": float(score)})
    categories = [{"id": index} for index in range(num_classes)]

    with contextlib.redirect_stdout(io.StringIO()):
        truth_coco, found_coco = COCO(), COCO()
        truth_coco.dataset = {"images": images, "annotations": truth_annotations, "categories": categories}
        found_coco.dataset = {"images": images, "annotations": found_annotations, "categories": categories}
        truth_coco.createIndex()
        found_coco.createIndex()
        evaluator = COCOeval(truth_coco, found_coco, iouType="bbox")
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision is [IoU thresholds, recall thresholds, classes, area ranges, max detections];
    # area range 0 is "all" and the last max-detections entry is `max_detections`, as in stats[0:2].
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    stats = evaluator.stats
    return CocoMetrics(
        map=float(stats[0]) if stats[0] > -1 else float("nan"),
        ap50=float(stats[1]) if stats[1] > -1 else float("nan"),
        per_class_ap=tuple(_class_mean(precision[:, :, k]) for k in range(num_classes)),
        per_class_ap50=tuple(_class_mean(precision[0, :, k]) for k in range(num_classes)),
        precision=precision,
    )


def _percent_curve(values: np.ndarray) -> list[float] | None:
    return None if (values < 0).any() else [round(float(v) * 100.0, 3) for v in values]


def pr_curves(metrics: CocoMetrics) -> dict[str, Any]:
    """Each class's precision-recall curve from `metrics.precision`, JSON-ready, in percent (0-100):
    "recall" (the 101 recall points), "precision" (one curve per class index, averaged over the ten
    IoU thresholds, as mAP averages them) and "precision50" (at IoU 0.5, as AP50); a class without
    ground truth has None for its curves."""
    precision = metrics.precision
    classes = precision.shape[2]
    return {
        "recall": [round(float(r) * 100.0, 3) for r in RECALL_POINTS],
        "precision": [
            None if (precision[:, :, k] < 0).any() else _percent_curve(precision[:, :, k].mean(axis=0))
            for k in range(classes)
        ],
        "precision50": [_percent_curve(precision[0, :, k]) for k in range(classes)],
    }
