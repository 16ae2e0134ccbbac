"""The outputs of an exported detection file, and their decoding into per-image detections.

Every exported detector (ONNX with `NonMaxSuppression`, ONNX with TensorRT's `EfficientNMS_TRT`, a
TensorRT engine) returns the same four outputs, the convention of TensorRT's EfficientNMS plugin:

    num_detections     int32   [B, 1]     how many rows of each image are real
    detection_boxes    float32 [B, K, 4]  x1, y1, x2, y2 in input pixels
    detection_scores   float32 [B, K]
    detection_classes  int32   [B, K]     0-based index into the run's class names

K is the file's `max_detections`. Rows at and past an image's num_detections are padding and are
never read. This module is the one place that reads them; it needs numpy alone (the edge install).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from deploy.errors import UsageError

NUM_DETECTIONS = "num_detections"
DETECTION_BOXES = "detection_boxes"
DETECTION_SCORES = "detection_scores"
DETECTION_CLASSES = "detection_classes"
# The file's output order, which every exporter writes and every runtime returns.
OUTPUT_NAMES = (NUM_DETECTIONS, DETECTION_BOXES, DETECTION_SCORES, DETECTION_CLASSES)
# Each output's dtype and rank.
OUTPUT_DTYPES = {
    NUM_DETECTIONS: np.dtype(np.int32),
    DETECTION_BOXES: np.dtype(np.float32),
    DETECTION_SCORES: np.dtype(np.float32),
    DETECTION_CLASSES: np.dtype(np.int32),
}
OUTPUT_RANKS = {NUM_DETECTIONS: 2, DETECTION_BOXES: 3, DETECTION_SCORES: 2, DETECTION_CLASSES: 2}


@dataclass(frozen=True)
class Detections:
    """One image's detections, best score first as NMS keeps them: `boxes` (n, 4) float32 x1, y1, x2,
    y2 input pixels, `scores` (n,) float32, `classes` (n,) int64 class indices."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def check_output_names(names: object, source: str) -> None:
    """UsageError naming `source` unless `names` is exactly the four detection outputs in their order
    (a file's outputs, read before running it)."""
    found = tuple(names) if isinstance(names, (list, tuple)) else names
    if found != OUTPUT_NAMES:
        raise UsageError(f"{source}: outputs {found!r}; a detection file returns {', '.join(OUTPUT_NAMES)}")


def _checked(outputs: Mapping[str, object], name: str, source: str) -> np.ndarray:
    if name not in outputs:
        raise UsageError(f"{source}: no output {name!r}; a detection file returns {', '.join(OUTPUT_NAMES)}")
    array = outputs[name]
    if not isinstance(array, np.ndarray):
        raise UsageError(f"{source}: output {name}: expected an array, got {type(array).__name__}")
    expected = OUTPUT_DTYPES[name]
    if array.dtype != expected or array.ndim != OUTPUT_RANKS[name]:
        raise UsageError(
            f"{source}: output {name}: {array.dtype} of shape {list(array.shape)}; expected {expected}"
            f" of rank {OUTPUT_RANKS[name]}"
        )
    return array


def decode_outputs(
    outputs: Mapping[str, object], source: str, num_classes: int | None = None
) -> list[Detections]:
    """Each image's real detections from a detection file's outputs (name -> array, as a runtime
    returns them for one batch), padding dropped.

    UsageError naming `source` (the file) and the output when an output is missing or of the wrong
    dtype, rank or shape, when the batch sizes or K disagree, when a count lies outside 0..K, when a
    real row's box or score is not finite or its box is inverted, or when a real row's class is
    negative or, given `num_classes`, not below it: the file is not what the contract says, and its
    rows would be read as something they are not.
    """
    counts = _checked(outputs, NUM_DETECTIONS, source)
    boxes = _checked(outputs, DETECTION_BOXES, source)
    scores = _checked(outputs, DETECTION_SCORES, source)
    classes = _checked(outputs, DETECTION_CLASSES, source)
    batch, top_k = scores.shape
    expected = {
        NUM_DETECTIONS: (batch, 1),
        DETECTION_BOXES: (batch, top_k, 4),
        DETECTION_CLASSES: (batch, top_k),
    }
    for name, array in ((NUM_DETECTIONS, counts), (DETECTION_BOXES, boxes), (DETECTION_CLASSES, classes)):
        if array.shape != expected[name]:
            raise UsageError(
                f"{source}: output {name}: shape {list(array.shape)}; expected {list(expected[name])}"
                f" ({DETECTION_SCORES} is {list(scores.shape)})"
            )
    decoded = []
    for image in range(batch):
        count = int(counts[image, 0])
        if not 0 <= count <= top_k:
            raise UsageError(
                f"{source}: output {NUM_DETECTIONS}: image {image} has {count}; expected 0..{top_k}"
            )
        found = Detections(
            boxes=boxes[image, :count].copy(),
            scores=scores[image, :count].copy(),
            classes=classes[image, :count].astype(np.int64),
        )
        _check_rows(found, image, source, num_classes)
        decoded.append(found)
    return decoded


def _check_rows(found: Detections, image: int, source: str, num_classes: int | None) -> None:
    where = f"{source}: image {image}"
    if not (np.isfinite(found.boxes).all() and np.isfinite(found.scores).all()):
        raise UsageError(f"{where}: a detection's box or score is not finite")
    if (found.boxes[:, 2:] < found.boxes[:, :2]).any():
        raise UsageError(f"{where}: a detection's box has x2 < x1 or y2 < y1")
    if not len(found):
        return
    low, high = int(found.classes.min()), int(found.classes.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        raise UsageError(f"{where}: detection classes {low}..{high}; expected {bound}")
