"""The detection export's measurements: a detector's files scored against ground truth, int8
calibrated and mixed by mAP (export.detection_producing runs them, as export_run's producers of a
detection run). Every file is checked and gated as classifiers' are (deploy.gates, the detection
table).

Files (export.detection makes each fp32 one; the others are made from export/student.onnx):

    export/student.onnx               fp32, ONNX NonMaxSuppression (ONNX Runtime, TensorRT >= 8.5)
    export/student.efficientnms.onnx  fp32, TensorRT's EfficientNMS_TRT plugin (TensorRT only)
    export/student.fp16.onnx          fp16 network, fp32 post-processing
    export/student.int8.onnx          int8 Q/DQ network (ONNX Runtime's uint8 flavour), fp32 post-processing
    export/student.int8.trt.onnx      int8 Q/DQ network (TensorRT's symmetric flavour), fp32 post-processing

Checks, on every image of the run's validation split:
- fp32 against the torch student: box parity (deploy.detection.parity), gated by min_box_parity;
- every other ONNX Runtime file against fp32: its COCO mAP@[.5:.95] drop with the paired image-level
  bootstrap 95% interval (deploy.detection.bootstrap), gated by max_map_drop on that interval;
- the EfficientNMS file cannot run here: checked for its structure (the plugin node and the four
  outputs), its numbers left to the TensorRT build.

int8 calibration is measured, as for classifiers (export.calibration): a fixed-seed shuffle of the
training images is cut into a calibration part and a held-out part; every method of
CALIBRATION_METHODS quantizes the network, and the one whose file scores the best mAP on the
held-out images wins. Only the network's nodes are quantized: the post-processing stays fp32. Where
the winner loses more than `max_map_drop_int8` mAP points against fp32 on the held-out images, parts of
the head stay float (FLOAT_STEPS), the first step within the budget kept: mixed precision with mAP as
its budget's metric.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploy.detection.annotations import ImageAnnotation
from deploy.detection.bootstrap import ImageMatches, map_drop, match_images
from deploy.detection.coco_metric import Detections as CocoDetections
from deploy.detection.coco_metric import coco_metrics
from deploy.detection.images import image_batches
from deploy.detection.onnx_run import detect_onnx
from deploy.detection.outputs import OUTPUT_NAMES, Detections
from deploy.gates import evaluate_gates, gates_for
from deploy.status import Status
from deploy.tasks import DETECTION, TASKS
from export.check import CheckResult
from export.detection import EFFICIENT_NMS_OP, postprocess_nodes
from export.onnx_export import get_metadata, save_onnx, set_metadata
from export.precision import CALIBRATION_METHODS, Int8Quantizer

CALIBRATION_SEED = 0
DEFAULT_HELD_OUT = 128
# What stays float, step by step, when int8 loses more than that (module paths of the traced body's
# node names): first the head's three output convolutions, whose error lands straight in the scores
# and boxes, then the whole head.
FLOAT_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "the head's output convolutions",
        (
            "/head/classification_head/cls_logits",
            "/head/regression_head/bbox_reg",
            "/head/regression_head/bbox_ctrness",
        ),
    ),
    ("the whole head", ("/head/",)),
)


def coco_detections(found: Sequence[Detections]) -> list[CocoDetections]:
    return [CocoDetections(f.boxes, f.scores, f.classes) for f in found]


def split_training(
    records: Sequence[ImageAnnotation], calibration: int, held_out: int
) -> tuple[list[ImageAnnotation], list[ImageAnnotation]]:
    """The first `calibration` and the next `held_out` of a fixed-seed shuffle of the training images;
    where there are fewer images than both, calibration gets what the held-out part leaves (at least
    half of them), so that the choice of method is always measured."""
    held_out = min(held_out, len(records) // 2)
    calibration = min(calibration, len(records) - held_out)
    order = list(range(len(records)))
    random.Random(CALIBRATION_SEED).shuffle(order)
    shuffled = [records[i] for i in order]
    return shuffled[:calibration], shuffled[calibration : calibration + held_out]


class DetectionScorer:
    """One image set with its ground truth, and the files' detections (run on `device`,
    deploy.detection.onnx_run.detect_onnx) and mAP on it."""

    def __init__(
        self,
        records: Sequence[ImageAnnotation],
        size: tuple[int, int],
        batch_size: int,
        classes: int,
        device: str = "cpu",
    ):
        self.records = list(records)
        self.batches = list(image_batches(self.records, size, batch_size))
        self.classes = classes
        self.device = device

    def detect(self, path: Path) -> list[Detections]:
        return self.detect_on(path)[0]

    def detect_on(self, path: Path) -> tuple[list[Detections], str]:
        """The file's detections on every image, and the device it ran on (detect_onnx)."""
        return detect_onnx(path, self.batches, self.classes, self.device)

    def matches(self, found: Sequence[Detections]) -> ImageMatches:
        return match_images(self.records, found, self.classes)

    def map(self, found: Sequence[Detections]) -> float:
        """COCO mAP@[.5:.95] in percent (pycocotools)."""
        return 100.0 * coco_metrics(self.records, coco_detections(found), self.classes).map


def map_check(
    rel: str,
    precision: str,
    scorer: DetectionScorer,
    reference: ImageMatches,
    found: Sequence[Detections],
    device: str,
) -> CheckResult:
    """A file's mAP drop against fp32, gated by its precision's detection gates; `device` is where
    the file ran (metrics["device"])."""
    coco = coco_metrics(scorer.records, coco_detections(found), scorer.classes)
    drop = map_drop(reference, scorer.matches(found))
    accuracy = {**drop.as_dict(), "map": 100.0 * coco.map, "ap50": 100.0 * coco.ap50}
    checks = evaluate_gates({"accuracy": accuracy}, gates_for(TASKS[DETECTION].gates, precision))
    failed = [c for c in checks if not c["passed"]]
    verdicts = {c.get("verdict") for c in checks}
    status = Status.FAILED if failed else Status.INCONCLUSIVE if "inconclusive" in verdicts else Status.OK
    low, high = drop.low, drop.high
    reason = (
        f"mAP {accuracy['map']:.2f} (fp32 {drop.reference_map:.2f}): drop {drop.drop:.2f} points,"
        f" 95% CI [{low:.2f}, {high:.2f}] over {drop.images} images"
    )
    metrics = {"accuracy": accuracy, "gates": checks, "device": device}
    return CheckResult(rel, precision, status, reason, metrics)


def check_efficient_nms(path: Path) -> CheckResult:
    """The EfficientNMS file's structure: one plugin node whose outputs are the file's four."""
    model = onnx.load(str(path))
    nodes = [node for node in model.graph.node if node.op_type == EFFICIENT_NMS_OP]
    outputs = [output.name for output in model.graph.output]
    if len(nodes) != 1 or list(nodes[0].output) != list(OUTPUT_NAMES) or outputs != list(OUTPUT_NAMES):
        return CheckResult(
            str(path), "fp32", Status.FAILED, f"not one {EFFICIENT_NMS_OP} node giving the outputs"
        )
    return CheckResult(
        str(path),
        "fp32",
        Status.SKIPPED,
        f"structure checked ({EFFICIENT_NMS_OP} node, four outputs); ONNX Runtime cannot run the plugin",
    )


def _network_nodes(prepared: onnx.ModelProto, float_prefixes: Sequence[str]) -> list[str]:
    """The prepared model's nodes to quantize: the network's, less those under `float_prefixes`."""
    kept = set(postprocess_nodes(prepared))
    return [
        node.name
        for node in prepared.graph.node
        if node.name not in kept and not any(node.name.startswith(prefix) for prefix in float_prefixes)
    ]


def _write_int8(
    fp32_path: Path,
    path: Path,
    flavour: str,
    calibration: Sequence[np.ndarray],
    method: str,
    float_prefixes: Sequence[str] = (),
) -> None:
    root = logging.getLogger()
    root.addFilter(_rank_one_weight_note)
    try:
        with Int8Quantizer(fp32_path, calibration, flavour=flavour, method=method) as quantizer:
            network = _network_nodes(onnx.load(str(quantizer.prepared)), float_prefixes)
            record = {"post_processing": "fp32", "float_modules": list(float_prefixes)}
            quantizer.write(path, only_nodes=network, record=record)
    finally:
        root.removeFilter(_rank_one_weight_note)


def _rank_one_weight_note(record: logging.LogRecord) -> bool:
    """Drop ONNX Runtime's per-channel note on the rank-1 scale constants of the head's GroupNorms
    (it quantizes them per tensor instead): dozens of identical lines per calibration otherwise."""
    return not record.getMessage().startswith("Axis 1 is out-of-range for weight")


def quantize_detector(
    fp32_path: Path,
    dst: Path,
    flavour: str,
    calibration: Sequence[np.ndarray],
    held_out: DetectionScorer | None,
    method: str,
    budget: float | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Quantize the network of `fp32_path` to int8 at `dst` with the best calibration method on the
    held-out images (or `method` alone when it is not "auto"); where that file loses more than
    `budget` mAP points against fp32 on the held-out images, the FLOAT_STEPS are tried in turn and
    the first within it is kept (else the best of all tried). Returns the file's description."""
    methods = CALIBRATION_METHODS if method == "auto" else (method,)
    scores: dict[str, float] = {}
    mixed: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="reviewkd-detquant-") as tmp:
        best: tuple[float, str, Path] | None = None
        for candidate in methods:
            path = Path(tmp) / f"{candidate}.onnx"
            _write_int8(fp32_path, path, flavour, calibration, candidate)
            if held_out is None:
                best = (math.nan, candidate, path)
                break
            scores[candidate] = held_out.map(held_out.detect(path))
            log(f"  {dst.name} calibration {candidate}: held-out mAP {scores[candidate]:.2f}")
            if best is None or scores[candidate] > best[0]:
                best = (scores[candidate], candidate, path)
        assert best is not None
        if held_out is not None and budget is not None:
            reference = held_out.map(held_out.detect(fp32_path))
            chosen, steps = best, dict[str, float]()
            for label, prefixes in FLOAT_STEPS:
                if reference - chosen[0] <= budget:
                    break
                path = Path(tmp) / f"{best[1]}.{len(steps)}.onnx"
                _write_int8(fp32_path, path, flavour, calibration, best[1], prefixes)
                steps[label] = held_out.map(held_out.detect(path))
                log(f"  {dst.name} keeping {label} in float: held-out mAP {steps[label]:.2f}")
                if steps[label] > chosen[0]:
                    chosen = (steps[label], label, path)
            mixed = {
                "budget_map_points": budget,
                "held_out_fp32_map": reference,
                "held_out_map": chosen[0],
                "met": reference - chosen[0] <= budget,
                "float_steps_map": steps,
                "float": chosen[1] if chosen is not best else None,
            }
            best = (chosen[0], best[1], chosen[2])
        model = onnx.load(str(best[2]))
    metadata = get_metadata(model)
    description = dict(metadata.get("int8", {}))
    description["calibration"] = {
        **description.get("calibration", {}),
        "held_out_map": scores,
        "chosen": best[1],
    }
    if mixed:
        description["mixed_precision"] = mixed
    set_metadata(model, {**metadata, "int8": description})
    save_onnx(model, dst)
    return description


@dataclass(frozen=True)
class DetectionTruth:
    """A detection export's ground truth (export.producing.CheckImages.ground_truth): the check
    images' boxes, scored, and the training images int8 calibrates and is judged on."""

    checks: DetectionScorer
    train: list[ImageAnnotation]
