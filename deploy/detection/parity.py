"""Box parity: how many of a reference's detections (the torch detector) a file reproduces.

A reference detection is matched when the candidate (the exported file, on the same image) has an
unmatched detection of the same class whose box overlaps it at IoU >= `min_iou` and whose score
differs by at most `max_score_diff`. References are taken best score first and each takes the
best-overlapping candidate left, so one candidate never answers for two references.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deploy.detection.outputs import Detections
from deploy.errors import UsageError

# Issue 19's goal for the fp32 ONNX file against torch: 99% of torch's detections matched at
# IoU >= 0.99 with scores within 1e-3.
PARITY_MIN_IOU = 0.99
PARITY_MAX_SCORE_DIFF = 1e-3
PARITY_MIN_MATCHED = 0.99


@dataclass(frozen=True)
class BoxParity:
    """Matching counts over all images: `matched` of `reference` detections, `candidate` detections
    found by the file, the worst IoU and score difference among the matched, and the images."""

    reference: int
    candidate: int
    matched: int
    images: int
    min_iou: float
    max_score_diff: float
    worst_iou: float
    worst_score_diff: float

    @property
    def matched_fraction(self) -> float:
        """Matched over reference detections (1.0 when neither the reference nor the file found any)."""
        if self.reference == 0:
            return 1.0 if self.candidate == 0 else 0.0
        return self.matched / self.reference

    def passes(self, min_matched: float = PARITY_MIN_MATCHED) -> bool:
        """Whether at least `min_matched` of the reference detections were matched."""
        return self.matched_fraction >= min_matched

    def as_dict(self) -> dict[str, float | int | bool]:
        """A JSON-ready form for the manifest."""
        return {
            "reference_detections": self.reference,
            "candidate_detections": self.candidate,
            "matched": self.matched,
            "matched_fraction": self.matched_fraction,
            "images": self.images,
            "min_iou": self.min_iou,
            "max_score_diff": self.max_score_diff,
            "worst_matched_iou": self.worst_iou,
            "worst_matched_score_diff": self.worst_score_diff,
            "passed": self.passes(),
        }


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """IoU of every box of `first` (n, 4) against every box of `second` (m, 4), x1, y1, x2, y2."""
    first = np.asarray(first, np.float64).reshape(-1, 4)
    second = np.asarray(second, np.float64).reshape(-1, 4)
    low = np.maximum(first[:, None, :2], second[None, :, :2])
    high = np.minimum(first[:, None, 2:], second[None, :, 2:])
    overlap = np.clip(high - low, 0, None).prod(axis=2)
    area_first = (first[:, 2:] - first[:, :2]).prod(axis=1)
    area_second = (second[:, 2:] - second[:, :2]).prod(axis=1)
    union = area_first[:, None] + area_second[None, :] - overlap
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, overlap / union, 0.0)


def _match_image(
    reference: Detections, candidate: Detections, min_iou: float, max_score_diff: float
) -> tuple[int, float, float]:
    """(matched, worst IoU, worst score difference) on one image."""
    iou = box_iou(reference.boxes, candidate.boxes)
    taken = np.zeros(len(candidate), dtype=bool)
    matched, worst_iou, worst_diff = 0, 1.0, 0.0
    for row in np.argsort(-np.asarray(reference.scores), kind="stable"):
        diff = np.abs(np.asarray(candidate.scores, np.float64) - float(reference.scores[row]))
        fits = (
            ~taken
            & (np.asarray(candidate.classes) == reference.classes[row])
            & (iou[row] >= min_iou)
            & (diff <= max_score_diff)
        )
        if not fits.any():
            continue
        best = int(np.argmax(np.where(fits, iou[row], -1.0)))
        taken[best] = True
        matched += 1
        worst_iou = min(worst_iou, float(iou[row, best]))
        worst_diff = max(worst_diff, float(diff[best]))
    return matched, worst_iou, worst_diff


def box_parity(
    reference: Sequence[Detections],
    candidate: Sequence[Detections],
    *,
    min_iou: float = PARITY_MIN_IOU,
    max_score_diff: float = PARITY_MAX_SCORE_DIFF,
) -> BoxParity:
    """Match `candidate`'s detections to `reference`'s image by image (module docstring).

    UsageError when the two cover different numbers of images.
    """
    if len(reference) != len(candidate):
        raise UsageError(
            f"box parity: {len(reference)} reference images against {len(candidate)} candidate ones"
        )
    matched, worst_iou, worst_diff = 0, 1.0, 0.0
    for ref, found in zip(reference, candidate, strict=True):
        count, image_iou, image_diff = _match_image(ref, found, min_iou, max_score_diff)
        matched += count
        if count:
            worst_iou, worst_diff = min(worst_iou, image_iou), max(worst_diff, image_diff)
    return BoxParity(
        reference=sum(len(r) for r in reference),
        candidate=sum(len(c) for c in candidate),
        matched=matched,
        images=len(reference),
        min_iou=min_iou,
        max_score_diff=max_score_diff,
        worst_iou=worst_iou if matched else float("nan"),
        worst_score_diff=worst_diff if matched else float("nan"),
    )
