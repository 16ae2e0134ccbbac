"""decode_outputs: the detection file contract's four outputs read into per-image detections."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.detection.outputs import (
    DETECTION_BOXES,
    DETECTION_CLASSES,
    DETECTION_SCORES,
    NUM_DETECTIONS,
    OUTPUT_NAMES,
    check_output_names,
    decode_outputs,
)
from deploy.errors import UsageError
from deploy.manifest import DetectionSettings, detection_settings

SOURCE = "model.onnx"


def _outputs() -> dict[str, np.ndarray]:
    """Two images, K = 3: the first with two detections, the second with none (all padding)."""
    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[0, 0] = [1, 2, 11, 12]
    boxes[0, 1] = [5, 5, 6, 9]
    scores = np.zeros((2, 3), np.float32)
    scores[0, :2] = [0.9, 0.4]
    classes = np.zeros((2, 3), np.int32)
    classes[0, :2] = [2, 0]
    return {
        NUM_DETECTIONS: np.array([[2], [0]], np.int32),
        DETECTION_BOXES: boxes,
        DETECTION_SCORES: scores,
        DETECTION_CLASSES: classes,
    }


def test_real_rows_are_kept_and_padding_dropped() -> None:
    first, second = decode_outputs(_outputs(), SOURCE, num_classes=3)
    assert np.array_equal(first.boxes, [[1, 2, 11, 12], [5, 5, 6, 9]])
    assert np.allclose(first.scores, [0.9, 0.4])
    assert first.classes.tolist() == [2, 0]
    assert len(second) == 0 and second.boxes.shape == (0, 4)


def test_garbage_in_padding_rows_is_never_read() -> None:
    outputs = _outputs()
    outputs[DETECTION_BOXES][1] = np.nan
    outputs[DETECTION_CLASSES][1] = -7
    assert len(decode_outputs(outputs, SOURCE, num_classes=3)[1]) == 0


def _broken(change: str) -> dict[str, np.ndarray]:
    outputs = _outputs()
    if change == "missing":
        del outputs[DETECTION_SCORES]
    elif change == "dtype":
        outputs[DETECTION_CLASSES] = outputs[DETECTION_CLASSES].astype(np.int64)
    elif change == "shape":
        outputs[DETECTION_BOXES] = outputs[DETECTION_BOXES][:, :2]
    elif change == "count":
        outputs[NUM_DETECTIONS][1, 0] = 4
    elif change == "class":
        outputs[DETECTION_CLASSES][0, 0] = 3
    elif change == "inverted":
        outputs[DETECTION_BOXES][0, 1] = [6, 5, 5, 9]
    elif change == "nan":
        outputs[DETECTION_SCORES][0, 1] = np.nan
    return outputs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", "no output 'detection_scores'"),
        ("dtype", "output detection_classes: int64"),
        ("shape", r"output detection_boxes: shape \[2, 2, 4\]; expected \[2, 3, 4\]"),
        ("count", "image 1 has 4; expected 0..3"),
        ("class", "image 0: detection classes 0..3; expected 0..2"),
        ("inverted", "x2 < x1"),
        ("nan", "not finite"),
    ],
)
def test_outputs_against_the_contract_are_a_one_line_usage_error(change: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        decode_outputs(_broken(change), SOURCE, num_classes=3)
    assert str(caught.value).startswith(SOURCE) and "\n" not in str(caught.value)


def test_output_names_must_be_the_contract_in_its_order() -> None:
    check_output_names(list(OUTPUT_NAMES), SOURCE)
    with pytest.raises(UsageError, match=f"{SOURCE}: outputs"):
        check_output_names(["logits"], SOURCE)
    with pytest.raises(UsageError, match="outputs"):
        check_output_names(list(reversed(OUTPUT_NAMES)), SOURCE)


def test_detection_settings_round_trip_through_the_manifest_block() -> None:
    settings = DetectionSettings(max_detections=50, score_threshold=0.05, iou_threshold=0.5)
    assert detection_settings({"detection": settings.block()}) == settings


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (None, "detection: expected an object"),
        ({"max_detections": 0, "score_threshold": 0.1, "iou_threshold": 0.5}, "detection.max_detections"),
        ({"max_detections": 10, "score_threshold": 1.5, "iou_threshold": 0.5}, "detection.score_threshold"),
        ({"max_detections": 10, "score_threshold": 0.1, "iou_threshold": True}, "detection.iou_threshold"),
    ],
)
def test_a_bad_detection_block_is_a_usage_error_naming_its_key(block: object, message: str) -> None:
    with pytest.raises(UsageError, match=f"run/manifest.json: {message}"):
        detection_settings({"detection": block}, "run/manifest.json")
