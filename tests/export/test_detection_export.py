"""A detector exported with its post-processing inside: ONNX Runtime against torch, and the
EfficientNMS_TRT form's structure as TensorRT's plugin documents it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from deploy.detection.onnx_run import DetectionSession, detect_onnx
from deploy.detection.outputs import OUTPUT_NAMES
from deploy.detection.parity import box_parity
from deploy.errors import UsageError
from export.detection import (
    EFFICIENT_NMS_OP,
    NMS_TRT,
    TRT_PLUGIN_DOMAIN,
    export_detector,
    postprocess_nodes,
)
from export.onnx_export import get_metadata
from reviewkd.detection.inference import torch_detections
from tests.helpers import DETECTOR_CLASSES, DETECTOR_INPUT_SHAPE, tiny_detector


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny detector exported in both NMS forms."""
    folder = tmp_path_factory.mktemp("detector")
    detector = tiny_detector()
    onnx_file, trt_file = folder / "student.onnx", folder / "student_trt.onnx"
    export_detector(detector, onnx_file, DETECTOR_INPUT_SHAPE, {"classes": DETECTOR_CLASSES})
    export_detector(detector, trt_file, DETECTOR_INPUT_SHAPE, {"classes": DETECTOR_CLASSES}, nms=NMS_TRT)
    return onnx_file, trt_file


def _images(count: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((count, *DETECTOR_INPUT_SHAPE), dtype=np.float32)


def test_onnx_runtime_reproduces_torch_box_for_box_at_every_batch_size(exported: tuple[Path, Path]) -> None:
    images = _images(5)
    reference = torch_detections(tiny_detector(), [images])
    # Every image fills K rows, and more candidates than torchvision's per-level cap pass the score
    # threshold: the cap, the per-class NMS and the top-K all decide which boxes are kept.
    assert all(len(found) == 100 for found in reference)
    for batches in ([images], [images[:1], images[1:4], images[4:]]):
        found, device = detect_onnx(exported[0], batches, len(DETECTOR_CLASSES))
        parity = box_parity(reference, found)
        assert device == "cpu"
        assert parity.matched == parity.reference == parity.candidate == 500
        assert parity.worst_iou >= 0.9999 and parity.worst_score_diff <= 1e-5


def test_the_file_records_its_post_processing_and_keeps_it_apart(exported: tuple[Path, Path]) -> None:
    model = onnx.load(str(exported[0]))
    metadata = get_metadata(model)
    assert metadata["detection"] == {"max_detections": 100, "score_threshold": 0.2, "iou_threshold": 0.6}
    assert metadata["nms"] == "onnx" and metadata["precision"] == "fp32"
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    kinds = {node.op_type for node in model.graph.node if node.name in set(postprocess_nodes(model))}
    assert {"NonMaxSuppression", "TopK", "Sigmoid", "GatherND"} <= kinds
    # the network itself holds no post-processing op
    assert not {"NonMaxSuppression", "TopK"} & {
        node.op_type for node in model.graph.node if node.name not in set(postprocess_nodes(model))
    }


def test_the_efficient_nms_node_is_the_plugin_as_tensorrt_documents_it(exported: tuple[Path, Path]) -> None:
    model = onnx.load(str(exported[1]))
    onnx.checker.check_model(model, full_check=True)
    (node,) = [node for node in model.graph.node if node.op_type == EFFICIENT_NMS_OP]
    assert node.domain == TRT_PLUGIN_DOMAIN
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {
        "plugin_version": b"1",
        "background_class": -1,
        "max_output_boxes": 100,
        "score_threshold": pytest.approx(0.2),
        "iou_threshold": pytest.approx(0.6),
        "score_activation": 0,
        "class_agnostic": 0,
        "box_coding": 0,
    }
    assert list(node.output) == list(OUTPUT_NAMES) == [o.name for o in model.graph.output]
    # Standard NMS mode: two inputs, boxes [B, N, 4] and scores [B, N, C] with the same N, which ONNX
    # Runtime computes when the graph ends just before the plugin.
    inputs = onnx.ModelProto()
    inputs.CopyFrom(model)
    inputs.graph.node.remove(node)
    del inputs.graph.output[:]
    inputs.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in node.input)
    del inputs.opset_import[1:]
    session = ort.InferenceSession(inputs.SerializeToString(), providers=["CPUExecutionProvider"])
    boxes, scores = session.run(None, {"images": _images(2)})
    assert boxes.shape == (2, 1360, 4) and scores.shape == (2, 1360, len(DETECTOR_CLASSES))
    assert boxes.dtype == scores.dtype == np.float32
    # each candidate scores in its one class column; the corner boxes lie inside the image
    assert ((scores > 0).sum(axis=2) <= 1).all()
    assert (boxes[..., 2:] >= boxes[..., :2]).all() and boxes.min() >= 0 and boxes[..., 2].max() <= 96
    types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert types == {
        "num_detections": onnx.TensorProto.INT32,
        "detection_boxes": onnx.TensorProto.FLOAT,
        "detection_scores": onnx.TensorProto.FLOAT,
        "detection_classes": onnx.TensorProto.INT32,
    }


def test_a_size_the_detector_would_resize_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="resizes or pads 32x48 images"):
        export_detector(tiny_detector(), tmp_path / "x.onnx", (3, 32, 48), {})
    assert not list(tmp_path.iterdir())


def test_a_file_with_other_outputs_is_refused_when_opened(tmp_path: Path) -> None:
    from tests.helpers import export_tiny_onnx, tiny_module

    classifier = export_tiny_onnx(tiny_module(), tmp_path / "classifier.onnx")
    with pytest.raises(UsageError, match=r"classifier\.onnx: outputs"):
        DetectionSession(classifier, 3)


def test_fewer_images_than_the_reference_are_refused() -> None:
    reference = torch_detections(tiny_detector(), [_images(2)])
    with pytest.raises(UsageError, match="2 reference images against 1"):
        box_parity(reference, reference[:1])


def test_a_small_training_split_still_leaves_held_out_images_to_choose_the_calibration() -> None:
    from export.detection_pipeline import split_training

    records: list[Any] = list(range(10))
    calibration, held_out = split_training(records, 512, 128)
    # 512 + 128 asked of 10 images: the held-out part keeps half, calibration the rest, disjoint
    assert (len(calibration), len(held_out)) == (5, 5) and not set(calibration) & set(held_out)
    calibration, held_out = split_training(records, 4, 3)
    assert (len(calibration), len(held_out)) == (4, 3)
