"""Export a trained FCOS detector to ONNX with its post-processing inside (deploy.detection.outputs).

The file takes `images` float32 [B, 3, H, W] as the run's input block says (RGB in 0-1 at the size
the detector was trained on) and returns num_detections, detection_boxes, detection_scores and
detection_classes. It is built in two parts:

- the body, traced by torch: the detector's own normalisation, backbone + FPN and head, returning
  the raw class logits [B, A, C], box regression [B, A, 4] and centreness [B, A, 1] of all A cells;
- the post-processing, written here as ONNX nodes (all named POSTPROCESS_PREFIX...), following
  torchvision's FCOS.postprocess_detections step for step: score = sqrt(sigmoid(logit) *
  sigmoid(centreness)); the `topk_candidates` best (cell, class) pairs of each level; boxes decoded
  from the cells' anchors and clipped to the image; NMS per class; the best K of what it keeps.

Two NMS forms end the graph (NMS_FORMS): "onnx", ONNX's NonMaxSuppression followed by a scatter and a
TopK that lay its kept boxes out as K rows per image (ONNX Runtime runs it; TensorRT >= 8.5 parses
it); and "trt", TensorRT's EfficientNMS_TRT plugin node, which returns the four outputs itself
(ONNX Runtime cannot run it; TensorRT's parser builds it as a plugin).

The post-processing nodes stay fp32 in every precision: the fp16 and int8 files quantize the
network, not the box arithmetic (`postprocess_nodes` names them for the converters).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList

from deploy.detection.outputs import (
    DETECTION_BOXES,
    DETECTION_CLASSES,
    DETECTION_SCORES,
    NUM_DETECTIONS,
    OUTPUT_NAMES,
)
from deploy.errors import UsageError
from deploy.manifest import DetectionSettings
from export.onnx_export import (
    DEFAULT_OPSET,
    check_opset,
    optimize_onnx,
    save_onnx,
    set_metadata,
    torch_export,
)
from reviewkd.detection.models import Detector

NMS_ONNX = "onnx"
NMS_TRT = "trt"
NMS_FORMS = (NMS_ONNX, NMS_TRT)
# Every post-processing node's name starts with this; the precision converters keep them fp32.
POSTPROCESS_PREFIX = "postprocess/"
# The domain of the EfficientNMS_TRT node: TensorRT's ONNX parser builds an op it does not know as
# the plugin of that name, whatever its domain; a domain of its own keeps ONNX's checker from
# looking the op up in the standard set.
TRT_PLUGIN_DOMAIN = "TRT"
EFFICIENT_NMS_OP = "EfficientNMS_TRT"
# The intermediate tensors the body returns (per cell: class logits, box regression, centreness).
BODY_OUTPUTS = ("cls_logits", "bbox_regression", "bbox_ctrness")
BATCH = "batch"


class DetectorBody(nn.Module):
    """An FCOS detector without its post-processing: images in 0-1 -> the head's raw outputs."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        model = detector.model
        self.backbone = model.get_submodule("backbone")
        self.head = model.get_submodule("head")
        transform = model.get_submodule("transform")
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = list(self.backbone((images - self.mean) / self.std).values())
        out = self.head(levels)
        return out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]


@dataclass(frozen=True)
class Geometry:
    """What the post-processing needs of a detector at one image size: its cells' anchors (A, 4)
    x1, y1, x2, y2 pixels, the cells of each level (finest first), the class count, the image size,
    and torchvision's per-level candidate count."""

    anchors: np.ndarray
    level_cells: tuple[int, ...]
    num_classes: int
    image_size: tuple[int, int]
    topk_candidates: int


def _fcos(detector: Detector) -> FCOS:
    """The detector's torchvision FCOS; UsageError for another architecture."""
    if not isinstance(detector.model, FCOS):
        raise UsageError(
            f"detector '{detector.name}': exporting with post-processing inside is built for FCOS detectors"
        )
    return detector.model


def settings_of(detector: Detector) -> DetectionSettings:
    """The post-processing settings the torch detector uses (its score and NMS thresholds and
    detections per image), which the exported file reproduces."""
    model = _fcos(detector)
    return DetectionSettings(
        max_detections=int(model.detections_per_img),
        score_threshold=float(model.score_thresh),
        iou_threshold=float(model.nms_thresh),
    )


def detector_geometry(detector: Detector, image_size: tuple[int, int]) -> Geometry:
    """The anchors and levels of `detector` on images of `image_size` (H, W).

    UsageError unless the detector is an FCOS and its own transform leaves images of that size as
    they are (no resize, no padding): the file takes them at that size and its boxes are in their
    pixels.
    """
    model = _fcos(detector)
    height, width = image_size
    transform = model.get_submodule("transform")
    scale = min(min(transform.min_size) / min(height, width), transform.max_size / max(height, width))
    divisible = transform.size_divisible
    if scale != 1.0 or height % divisible or width % divisible:
        raise UsageError(
            f"detector '{detector.name}': it resizes or pads {height}x{width} images (its transform takes"
            f" sides {min(transform.min_size)}..{transform.max_size}, multiples of {divisible}); export"
            " needs the size it runs at unchanged"
        )
    body = DetectorBody(detector).eval()
    with torch.no_grad():
        levels = list(body.backbone(torch.zeros(1, 3, height, width)).values())
        anchors = model.anchor_generator(
            ImageList(torch.zeros(1, 3, height, width), [(height, width)]), levels
        )
    return Geometry(
        anchors=anchors[0].numpy().astype(np.float32),
        level_cells=tuple(int(level.shape[2] * level.shape[3]) for level in levels),
        num_classes=detector.num_classes,
        image_size=(height, width),
        topk_candidates=int(model.topk_candidates),
    )


def export_body(body: DetectorBody, input_shape: tuple[int, int, int], opset: int) -> onnx.ModelProto:
    """Trace the body to ONNX with a symbolic batch, as export_fp32 traces a classifier."""
    return torch_export(body.eval(), input_shape, opset, output_names=BODY_OUTPUTS)


class _Nodes:
    """Appends post-processing nodes and constants to a graph, every name under POSTPROCESS_PREFIX."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{POSTPROCESS_PREFIX}{stem}_{self.count}"

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs: Any) -> Any:
        """Add one node; returns its output name, or the names when it has several."""
        names = (
            [self.name(op_type.lower()) for _ in range(outputs)]
            if isinstance(outputs, int)
            else list(outputs)
        )
        domain = attrs.pop("domain", "")
        self.graph.node.append(
            helper.make_node(op_type, list(inputs), names, name=self.name(op_type), domain=domain, **attrs)
        )
        return names[0] if len(names) == 1 else names


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _candidates(nodes: _Nodes, geometry: Geometry) -> tuple[str, str]:
    """Scores, decoding and the per-level candidates: (boxes [B, N, 4], scores [B, N, C]) where a
    candidate's score sits in its class's column and the other columns hold 0 (below any threshold)."""
    logits, regression, centreness = BODY_OUTPUTS
    classes = geometry.num_classes
    score = nodes.op(
        "Sqrt", [nodes.op("Mul", [nodes.op("Sigmoid", [logits]), nodes.op("Sigmoid", [centreness])])]
    )
    # torchvision's BoxLinearCoder with normalize_by_size: x1 = cx - l * w, ..., x2 = cx + r * w.
    anchors = geometry.anchors
    centre = 0.5 * (anchors[:, :2] + anchors[:, 2:])
    size = anchors[:, 2:] - anchors[:, :2]
    scale = np.concatenate([-size, size], axis=1).astype(np.float32)
    height, width = geometry.image_size
    boxes = nodes.op(
        "Add",
        [
            nodes.op("Mul", [regression, nodes.const("box_scale", scale)]),
            nodes.const("box_centre", np.tile(centre, 2).astype(np.float32)),
        ],
    )
    limit = np.array([width, height, width, height], dtype=np.float32)
    boxes = nodes.op(
        "Max",
        [
            nodes.op("Min", [boxes, nodes.const("image_limit", limit)]),
            nodes.const("zero", np.zeros(1, np.float32)),
        ],
    )
    scores, cells, labels = [], [], []
    start = 0
    for count in geometry.level_cells:
        level = nodes.op(
            "Slice",
            [
                score,
                nodes.const("start", _i64(start)),
                nodes.const("end", _i64(start + count)),
                nodes.const("axis", _i64(1)),
            ],
        )
        flat = nodes.op("Reshape", [level, nodes.const("flat", _i64(0, -1))])
        top = min(geometry.topk_candidates, count * classes)
        value, index = nodes.op("TopK", [flat, nodes.const("k", _i64(top))], 2, axis=-1, largest=1, sorted=1)
        scores.append(value)
        cells.append(
            nodes.op(
                "Add",
                [
                    nodes.op("Div", [index, nodes.const("classes", _i64(classes))]),
                    nodes.const("level_start", _i64(start)),
                ],
            )
        )
        labels.append(nodes.op("Mod", [index, nodes.const("classes", _i64(classes))]))
        start += count
    candidate_scores = nodes.op("Concat", scores, axis=1)
    candidate_cells = nodes.op("Concat", cells, axis=1)
    candidate_labels = nodes.op("Concat", labels, axis=1)
    candidate_boxes = nodes.op(
        "GatherND",
        [boxes, nodes.op("Unsqueeze", [candidate_cells, nodes.const("last", _i64(-1))])],
        batch_dims=1,
    )
    one_hot = nodes.op(
        "Equal",
        [
            nodes.op("Unsqueeze", [candidate_labels, nodes.const("last", _i64(-1))]),
            nodes.const("class_range", np.arange(classes, dtype=np.int64).reshape(1, 1, -1)),
        ],
    )
    class_scores = nodes.op(
        "Where",
        [
            one_hot,
            nodes.op("Unsqueeze", [candidate_scores, nodes.const("last", _i64(-1))]),
            nodes.const("zero", np.zeros(1, np.float32)),
        ],
    )
    return candidate_boxes, class_scores


def candidate_count(geometry: Geometry) -> int:
    """N, the candidates NMS sees per image: each level's best `topk_candidates` (cell, class) pairs."""
    return sum(min(geometry.topk_candidates, cells * geometry.num_classes) for cells in geometry.level_cells)


def _onnx_nms(
    nodes: _Nodes, boxes: str, class_scores: str, geometry: Geometry, settings: DetectionSettings
) -> None:
    """ONNX NonMaxSuppression per class, then the kept boxes laid out as the best K rows per image:
    their scores scattered into a [B, C * N] table of -1, whose TopK gives the rows in score order
    (a row whose value is -1 was never kept: padding)."""
    count = candidate_count(geometry)
    classes = geometry.num_classes
    top_k = settings.max_detections
    scores = nodes.op("Transpose", [class_scores], perm=[0, 2, 1])  # [B, C, N] as the op takes them
    selected = nodes.op(
        "NonMaxSuppression",
        [
            boxes,
            scores,
            nodes.const("max_per_class", _i64(top_k)),
            nodes.const("iou", np.array([settings.iou_threshold], np.float32)),
            nodes.const("score", np.array([settings.score_threshold], np.float32)),
        ],
        center_point_box=0,
    )
    one = nodes.const("one", _i64(1))

    def column(index: int) -> str:
        return nodes.op("Gather", [selected, nodes.const("column", np.array(index, np.int64))], axis=1)

    image, label, cell = column(0), column(1), column(2)
    kept_scores = nodes.op("GatherND", [scores, selected])
    slot = nodes.op("Add", [nodes.op("Mul", [label, nodes.const("n", _i64(count))]), cell])
    where = nodes.op(
        "Concat", [nodes.op("Unsqueeze", [image, one]), nodes.op("Unsqueeze", [slot, one])], axis=1
    )
    batch = nodes.op("Slice", [nodes.op("Shape", [boxes]), nodes.const("zero_i", _i64(0)), one])
    table_shape = nodes.op("Concat", [batch, nodes.const("slots", _i64(classes * count))], axis=0)
    table = nodes.op(
        "ConstantOfShape", [table_shape], value=numpy_helper.from_array(np.array([-1.0], np.float32))
    )
    table = nodes.op("ScatterND", [table, where, kept_scores])
    best, index = nodes.op("TopK", [table, nodes.const("k", _i64(top_k))], 2, axis=-1, largest=1, sorted=1)
    valid = nodes.op("Greater", [best, nodes.const("half", np.array(-0.5, np.float32))])
    zero_f = nodes.const("zero", np.zeros(1, np.float32))
    nodes.op(
        "ReduceSum", [nodes.op("Cast", [valid], to=TensorProto.INT32), one], [NUM_DETECTIONS], keepdims=1
    )
    nodes.op("Where", [valid, best, zero_f], [DETECTION_SCORES])
    label_of = nodes.op("Div", [index, nodes.const("n", _i64(count))])
    nodes.op(
        "Cast",
        [nodes.op("Where", [valid, label_of, nodes.const("zero_i", _i64(0))])],
        [DETECTION_CLASSES],
        to=TensorProto.INT32,
    )
    cell_of = nodes.op(
        "Unsqueeze", [nodes.op("Mod", [index, nodes.const("n", _i64(count))]), nodes.const("last", _i64(-1))]
    )
    picked = nodes.op("GatherND", [boxes, cell_of], batch_dims=1)
    nodes.op(
        "Where",
        [nodes.op("Unsqueeze", [valid, nodes.const("last", _i64(-1))]), picked, zero_f],
        [DETECTION_BOXES],
    )


def _trt_nms(nodes: _Nodes, boxes: str, class_scores: str, settings: DetectionSettings) -> None:
    """TensorRT's EfficientNMS_TRT plugin in standard mode (decoded corner boxes [B, N, 4], scores
    [B, N, C] already activated, no background class, NMS per class): its four outputs are the file's."""
    nodes.op(
        EFFICIENT_NMS_OP,
        [boxes, class_scores],
        list(OUTPUT_NAMES),
        domain=TRT_PLUGIN_DOMAIN,
        plugin_version="1",
        background_class=-1,
        max_output_boxes=settings.max_detections,
        score_threshold=settings.score_threshold,
        iou_threshold=settings.iou_threshold,
        score_activation=0,
        class_agnostic=0,
        box_coding=0,
    )


def with_postprocessing(
    body: onnx.ModelProto, geometry: Geometry, settings: DetectionSettings, nms: str
) -> onnx.ModelProto:
    """`body`'s graph with the post-processing appended and the four contract outputs as its outputs."""
    if nms not in NMS_FORMS:
        raise UsageError(f"nms {nms!r}: expected one of {', '.join(NMS_FORMS)}")
    model = onnx.ModelProto()
    model.CopyFrom(body)
    graph = model.graph
    del graph.output[:]
    nodes = _Nodes(graph)
    boxes, class_scores = _candidates(nodes, geometry)
    if nms == NMS_ONNX:
        _onnx_nms(nodes, boxes, class_scores, geometry, settings)
    else:
        _trt_nms(nodes, boxes, class_scores, settings)
        model.opset_import.append(helper.make_opsetid(TRT_PLUGIN_DOMAIN, 1))
    top_k = settings.max_detections
    graph.output.extend(
        [
            helper.make_tensor_value_info(NUM_DETECTIONS, TensorProto.INT32, [BATCH, 1]),
            helper.make_tensor_value_info(DETECTION_BOXES, TensorProto.FLOAT, [BATCH, top_k, 4]),
            helper.make_tensor_value_info(DETECTION_SCORES, TensorProto.FLOAT, [BATCH, top_k]),
            helper.make_tensor_value_info(DETECTION_CLASSES, TensorProto.INT32, [BATCH, top_k]),
        ]
    )
    return model


def postprocess_nodes(model: onnx.ModelProto) -> list[str]:
    """The names of `model`'s post-processing nodes (kept fp32 by the fp16 and int8 converters)."""
    return [node.name for node in model.graph.node if node.name.startswith(POSTPROCESS_PREFIX)]


def export_detector(
    detector: Detector,
    path: str | os.PathLike[str],
    input_shape: tuple[int, int, int],
    metadata: dict[str, Any],
    *,
    nms: str = NMS_ONNX,
    opset: int = DEFAULT_OPSET,
) -> dict[str, Any]:
    """Export `detector` with its post-processing (module docstring) to an fp32 ONNX file at `path`.

    `input_shape` is the run's (3, H, W); `metadata` (the run's manifest) is embedded with the
    precision, the NMS form and the detection block (K, thresholds: the detector's own). Returns
    what was done, for the manifest.
    """
    check_opset(opset)
    channels, height, width = input_shape
    if channels != 3:
        raise UsageError(f"detector '{detector.name}': input has {channels} channels; detectors take RGB")
    detector = detector.eval()
    settings = settings_of(detector)
    geometry = detector_geometry(detector, (height, width))
    if settings.max_detections > geometry.num_classes * candidate_count(geometry):
        settings = DetectionSettings(
            geometry.num_classes * candidate_count(geometry), settings.score_threshold, settings.iou_threshold
        )
    body = optimize_onnx(export_body(DetectorBody(detector), input_shape, opset))
    model = with_postprocessing(body, geometry, settings, nms)
    model.producer_name = "reviewkd"
    set_metadata(model, {**metadata, "precision": "fp32", "nms": nms, "detection": settings.block()})
    save_onnx(model, path)
    return {
        "opset": opset,
        "exporter": "torch.onnx (TorchScript) + post-processing nodes",
        "nms": nms,
        "nodes": len(model.graph.node),
        "candidates": candidate_count(geometry),
        "detection": settings.block(),
    }
