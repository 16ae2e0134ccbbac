"""COCO mAP under image resampling: the paired bootstrap interval of one format's mAP drop.

COCO's evaluation matches each image's detections to its ground truth on its own (per class, best
score first, at each IoU threshold 0.50:0.05:0.95), and only then pools the images' matches per class
into a precision-recall curve. So the matching is done once per image here (`ImageMatches`), exactly
as pycocotools' evaluateImg does it, and a bootstrap sample, which draws images with replacement,
only reweights each image's matches and ground-truth counts: the pooled curve of a sample is the
weighted one. With every weight 1 this gives pycocotools' mAP@[.5:.95] (the tests check it), for
images of at most COCO_MAX_DETECTIONS detections each, every box in the "all" area range.

A paired sample draws the same images for the reference (the fp32 file) and the candidate, so the
interval of the drop reflects how much the two disagree on the images, not how hard the images are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deploy.detection.coco_metric import GroundTruth
from deploy.detection.outputs import Detections
from deploy.detection.parity import box_iou
from deploy.errors import UsageError

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
COCO_MAX_DETECTIONS = 100
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class ImageMatches:
    """All images' detections matched to their ground truth, pooled: per detection its image, class,
    score, and whether it is a true positive / ignored (matched to a crowd region) at each IoU
    threshold (T, D); per image and class, the count of non-crowd ground-truth boxes (I, C)."""

    image: np.ndarray
    label: np.ndarray
    score: np.ndarray
    true_positive: np.ndarray
    ignored: np.ndarray
    truth_count: np.ndarray


def _match_one(truth: GroundTruth, found: Detections) -> tuple[np.ndarray, np.ndarray]:
    """(true positive, ignored), each (T, D) bool, of one image's detections, as COCO matches them."""
    truth_boxes = np.asarray(truth.boxes, np.float64).reshape(-1, 4)
    truth_labels = np.asarray(truth.labels)
    crowd = np.asarray(truth.crowd, bool)
    count = len(found)
    positive = np.zeros((len(IOU_THRESHOLDS), count), bool)
    ignored = np.zeros((len(IOU_THRESHOLDS), count), bool)
    for label in np.unique(np.asarray(found.classes)):
        dets = np.flatnonzero(np.asarray(found.classes) == label)
        dets = dets[np.argsort(-np.asarray(found.scores)[dets], kind="mergesort")][:COCO_MAX_DETECTIONS]
        gts = np.flatnonzero(truth_labels == label)
        gts = gts[np.argsort(crowd[gts], kind="mergesort")]  # non-crowd first, as COCO sorts them
        if not len(gts):
            continue
        iou = box_iou(np.asarray(found.boxes)[dets], truth_boxes[gts])
        # COCO's overlap with a crowd region is the intersection over the detection's area
        if crowd[gts].any():
            det_boxes = np.asarray(found.boxes, np.float64)[dets]
            area = (det_boxes[:, 2:] - det_boxes[:, :2]).prod(axis=1)
            overlap = box_intersection(det_boxes, truth_boxes[gts])
            crowd_iou = np.where(area[:, None] > 0, overlap / np.maximum(area[:, None], 1e-12), 0.0)
            iou = np.where(crowd[gts][None, :], crowd_iou, iou)
        is_crowd = crowd[gts]
        for t, threshold in enumerate(IOU_THRESHOLDS):
            taken = np.zeros(len(gts), bool)
            for row, det in enumerate(dets):
                best_iou, match = min(threshold, 1 - 1e-10), -1
                for col in range(len(gts)):
                    if taken[col] and not is_crowd[col]:
                        continue
                    if match > -1 and not is_crowd[match] and is_crowd[col]:
                        break
                    if iou[row, col] < best_iou:
                        continue
                    best_iou, match = iou[row, col], col
                if match == -1:
                    continue
                taken[match] = True
                ignored[t, det] = is_crowd[match]
                positive[t, det] = not is_crowd[match]
    return positive, ignored


def box_intersection(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The intersection area of every box of `first` with every box of `second`."""
    low = np.maximum(first[:, None, :2], second[None, :, :2])
    high = np.minimum(first[:, None, 2:], second[None, :, 2:])
    return np.clip(high - low, 0, None).prod(axis=2)


def match_images(
    truths: Sequence[GroundTruth], found: Sequence[Detections], num_classes: int
) -> ImageMatches:
    """Match every image's detections to its ground truth (module docstring); UsageError when the
    two cover different numbers of images or an image has more than COCO_MAX_DETECTIONS detections."""
    if len(truths) != len(found):
        raise UsageError(
            f"mAP bootstrap: {len(truths)} images of ground truth against {len(found)} of detections"
        )
    images, labels, scores, positives, ignores = [], [], [], [], []
    truth_count = np.zeros((len(truths), num_classes), np.int64)
    for index, (truth, dets) in enumerate(zip(truths, found, strict=True)):
        if len(dets) > COCO_MAX_DETECTIONS:
            raise UsageError(
                f"mAP bootstrap: image {index} has {len(dets)} detections; at most {COCO_MAX_DETECTIONS}"
            )
        keep = ~np.asarray(truth.crowd, bool)
        np.add.at(truth_count[index], np.asarray(truth.labels)[keep].astype(np.int64), 1)
        positive, ignored = _match_one(truth, dets)
        images.append(np.full(len(dets), index))
        labels.append(np.asarray(dets.classes, np.int64))
        scores.append(np.asarray(dets.scores, np.float64))
        positives.append(positive)
        ignores.append(ignored)
    return ImageMatches(
        image=np.concatenate(images) if images else np.zeros(0, np.int64),
        label=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        score=np.concatenate(scores) if scores else np.zeros(0),
        true_positive=np.concatenate(positives, axis=1)
        if positives
        else np.zeros((len(IOU_THRESHOLDS), 0), bool),
        ignored=np.concatenate(ignores, axis=1) if ignores else np.zeros((len(IOU_THRESHOLDS), 0), bool),
        truth_count=truth_count,
    )


def weighted_map(matches: ImageMatches, weights: np.ndarray) -> np.ndarray:
    """mAP@[.5:.95] (0-1) for each row of `weights` (S, I): how often each image is drawn. NaN where
    no class has ground truth in the sample."""
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    samples, classes = len(weights), matches.truth_count.shape[1]
    truth = weights @ matches.truth_count  # (S, C)
    total = np.zeros(samples)
    counted = np.zeros(samples)
    for label in range(classes):
        has_truth = truth[:, label] > 0
        if not has_truth.any():
            continue
        dets = np.flatnonzero(matches.label == label)
        # every image's detections, best first, ties in pooling order (pycocotools' mergesort)
        dets = dets[np.argsort(-matches.score[dets], kind="mergesort")]
        det_weights = weights[:, matches.image[dets]]  # (S, D)
        for t in range(len(IOU_THRESHOLDS)):
            counts = ~matches.ignored[t, dets]
            tp = np.cumsum(det_weights * (matches.true_positive[t, dets] & counts), axis=1)
            fp = np.cumsum(det_weights * (~matches.true_positive[t, dets] & counts), axis=1)
            ap = _average_precision(tp, fp, truth[:, label])
            total += np.where(has_truth, ap, 0.0)
            counted += has_truth
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted > 0, total / counted, np.nan)


def _average_precision(tp: np.ndarray, fp: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """COCO's 101-point interpolated AP per sample row, from cumulative weighted TP and FP (S, D)."""
    samples, width = tp.shape
    if width == 0:
        return np.zeros(samples)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / truth[:, None]
        precision = tp / (tp + fp + np.spacing(1))
    # precision envelope: the best precision at any recall at least as high
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    result = np.zeros(samples)
    for row in range(samples):
        if truth[row] <= 0:
            continue
        where = np.searchsorted(recall[row], RECALL_POINTS, side="left")
        valid = where < width
        result[row] = precision[row, where[valid]].sum() / len(RECALL_POINTS)
    return result


@dataclass(frozen=True)
class MapDrop:
    """The reference's mAP minus the candidate's (points), and its paired bootstrap interval."""

    reference_map: float
    candidate_map: float
    low: float
    high: float
    samples: int
    images: int

    @property
    def drop(self) -> float:
        return self.reference_map - self.candidate_map

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "reference_map": self.reference_map,
            "map": self.candidate_map,
            "map_drop": self.drop,
            "map_drop_interval": [self.low, self.high],
            "bootstrap_samples": self.samples,
            "images": self.images,
        }


def map_drop(
    reference: ImageMatches,
    candidate: ImageMatches,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> MapDrop:
    """The candidate's mAP drop against the reference in points, with the percentile interval of
    `samples` paired image-level bootstrap samples (the same draw of images for both)."""
    images = len(reference.truth_count)
    if len(candidate.truth_count) != images:
        raise UsageError(f"mAP bootstrap: {images} reference images against {len(candidate.truth_count)}")
    if images == 0:
        raise UsageError("mAP bootstrap: no images")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, size=(samples, images))
    weights = np.stack([np.bincount(row, minlength=images) for row in draws]).astype(np.float64)
    ones = np.ones((1, images))
    ref_map, cand_map = float(weighted_map(reference, ones)[0]), float(weighted_map(candidate, ones)[0])
    drops = weighted_map(reference, weights) - weighted_map(candidate, weights)
    drops = drops[np.isfinite(drops)]
    tail = (1 - confidence) / 2
    low, high = np.quantile(drops, [tail, 1 - tail]) if len(drops) else (np.nan, np.nan)
    return MapDrop(100 * ref_map, 100 * cand_map, 100 * float(low), 100 * float(high), samples, images)
