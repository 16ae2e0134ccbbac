"""`reviewkd export` for a detection run: the student with its post-processing inside, in every
precision, each file checked and gated as classifiers' are (deploy.gates, the detection table).

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
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploy import run_layout
from deploy.detection.annotations import ImageAnnotation
from deploy.detection.bootstrap import ImageMatches, map_drop, match_images
from deploy.detection.coco_metric import Detections as CocoDetections
from deploy.detection.coco_metric import coco_metrics
from deploy.detection.images import image_batches
from deploy.detection.onnx_run import detect_onnx
from deploy.detection.outputs import OUTPUT_NAMES, Detections
from deploy.detection.parity import box_parity
from deploy.errors import UsageError
from deploy.fileio import ensure_writable_dir, sha256_file
from deploy.formats import ONNX_FORMATS
from deploy.gates import evaluate_gates, gates_for
from deploy.manifest import input_spec, read_manifest
from deploy.run_lock import locks_run
from deploy.status import Status
from deploy.tasks import DETECTION, TASKS
from export.check import CheckResult
from export.detection import (
    EFFICIENT_NMS_OP,
    NMS_TRT,
    export_detector,
    postprocess_nodes,
)
from export.onnx_export import DEFAULT_OPSET, get_metadata, save_onnx, set_metadata
from export.pipeline import STUDENT_FILE, ExportRecorder, ExportSummary
from export.precision import CALIBRATION_METHODS, Int8Quantizer, convert_fp16
from export.timing import StageTimer
from reviewkd.config import load_run_config
from reviewkd.detection.engine import build_detection_data
from reviewkd.detection.inference import load_run_detector, torch_detections

EFFICIENT_NMS_FILE = run_layout.onnx_file("efficientnms")
# The EfficientNMS file's manifest kind: an ONNX file only TensorRT can build (its NMS is a TensorRT
# plugin), which ONNX Runtime's validate and bench therefore leave alone.
TRT_ONNX_KIND = "onnx-tensorrt"
EFFICIENT_NMS_FORMAT = "efficientnms"
DETECTION_FORMATS: tuple[str, ...] = ("onnx", EFFICIENT_NMS_FORMAT, "fp16", "int8", "int8-trt")
CALIBRATION_SEED = 0
DEFAULT_CALIB_SAMPLES = 256
DEFAULT_HELD_OUT = 128
# mAP points an int8 file may lose against fp32 on the held-out images before layers stay in float.
DEFAULT_MAX_MAP_DROP_INT8 = 1.0
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


def _coco(found: Sequence[Detections]) -> list[CocoDetections]:
    return [CocoDetections(f.boxes, f.scores, f.classes) for f in found]


def _split_training(
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


class _Scorer:
    """One image set with its ground truth, and the files' detections and mAP on it."""

    def __init__(
        self, records: Sequence[ImageAnnotation], size: tuple[int, int], batch_size: int, classes: int
    ):
        self.records = list(records)
        self.batches = list(image_batches(self.records, size, batch_size))
        self.classes = classes

    def detect(self, path: Path) -> list[Detections]:
        return detect_onnx(path, self.batches, self.classes)

    def matches(self, found: Sequence[Detections]) -> ImageMatches:
        return match_images(self.records, found, self.classes)

    def map(self, found: Sequence[Detections]) -> float:
        """COCO mAP@[.5:.95] in percent (pycocotools)."""
        return 100.0 * coco_metrics(self.records, _coco(found), self.classes).map


def _map_check(
    rel: str, precision: str, scorer: _Scorer, reference: ImageMatches, found: Sequence[Detections]
) -> CheckResult:
    """A file's mAP drop against fp32, gated by its precision's detection gates."""
    coco = coco_metrics(scorer.records, _coco(found), scorer.classes)
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
    return CheckResult(rel, precision, status, reason, {"accuracy": accuracy, "gates": checks})


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


def _quantize(
    fp32_path: Path,
    dst: Path,
    flavour: str,
    calibration: Sequence[np.ndarray],
    held_out: _Scorer | None,
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


@locks_run("export")
def export_detection_run(
    run_dir: str | os.PathLike[str],
    formats: Sequence[str] | None = None,
    *,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    calib_method: str = "auto",
    held_out_samples: int = DEFAULT_HELD_OUT,
    max_map_drop_int8: float | None = DEFAULT_MAX_MAP_DROP_INT8,
    batch_size: int = 16,
    opset: int | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    timer: StageTimer | None = None,
) -> ExportSummary:
    """Export a detection run's student to `formats` (default DETECTION_FORMATS), checking each file
    (module docstring). Returns the summary; its raise_for_status() turns failures into exit codes.

    Raises:
        UsageError: an unknown format, a run without a student or data, images of another size.
    """
    timer = timer or StageTimer()
    run = Path(run_dir)
    wanted = list(formats) if formats is not None else list(DETECTION_FORMATS)
    unknown = [f for f in wanted if f not in DETECTION_FORMATS]
    if unknown:
        raise UsageError(
            f"--formats {','.join(unknown)}: a detection run exports {', '.join(DETECTION_FORMATS)}"
        )
    if calib_method not in ("auto", *CALIBRATION_METHODS):
        raise UsageError(
            f"--calib-method {calib_method!r}: expected auto or one of {', '.join(CALIBRATION_METHODS)}"
        )
    manifest = read_manifest(run)
    spec = input_spec(manifest)
    config = load_run_config(run)
    detector = load_run_detector(run, manifest)
    ensure_writable_dir(run / run_layout.EXPORT_DIR)
    summary = ExportSummary(run)
    recorder = ExportRecorder(run, manifest, summary)
    size = (spec.shape[1], spec.shape[2])
    classes = len(manifest["classes"])
    with timer.shared("read check images"):
        data = build_detection_data(config)
        val = _Scorer(data.held_out.images, size, batch_size, classes)  # the test split under data.val_split
    if not val.records:
        raise UsageError(f"{run}: the validation split has no images to check the exported files on")
    summary.check_data = f"{len(val.records)} validation images of the run"
    metadata = {
        "task": DETECTION,
        "classes": manifest.get("classes", []),
        "input": manifest.get("input", {}),
        "student": {k: manifest.get("student", {}).get(k) for k in ("arch", "num_classes", "sha256")},
        "source_sha256": sha256_file(run / STUDENT_FILE),
    }
    opset = DEFAULT_OPSET if opset is None else opset
    recorder.block.update({"check_data": summary.check_data, "opset": opset, "formats": wanted})

    fp32_rel = ONNX_FORMATS["onnx"].file
    fp32_path = run / fp32_rel
    log(f"exporting {fp32_rel}")
    with timer.stage(fp32_rel, "export"):
        info = export_detector(detector, fp32_path, spec.shape, metadata, opset=opset)
    manifest["detection"] = info["detection"]
    with timer.stage(fp32_rel, "reference detections (PyTorch)"):
        reference = torch_detections(detector, val.batches)
    with timer.stage(fp32_rel, "check"):
        fp32_found = val.detect(fp32_path)
        parity = box_parity(reference, fp32_found)
        torch_map, fp32_coco = val.map(reference), coco_metrics(val.records, _coco(fp32_found), classes)
        measured = {
            "parity": {"box_matched": 100.0 * parity.matched_fraction, **parity.as_dict()},
            "accuracy": {
                "map": 100.0 * fp32_coco.map,
                "ap50": 100.0 * fp32_coco.ap50,
                "torch_map": torch_map,
            },
        }
        checks = evaluate_gates(measured, gates_for(TASKS[DETECTION].gates, "fp32"))
    passed = all(c["passed"] for c in checks)
    reason = (
        f"{parity.matched} of {parity.reference} torch detections matched (IoU >= {parity.min_iou},"
        f" score within {parity.max_score_diff:g}); mAP {100 * fp32_coco.map:.2f} (torch {torch_map:.2f})"
    )
    result = CheckResult(
        fp32_rel, "fp32", Status.OK if passed else Status.FAILED, reason, {**measured, "gates": checks}
    )
    fp32_ok = recorder.checked(fp32_rel, result, "onnx", precision="fp32", flavour="fp32", **info)
    log(f"  {fp32_rel}: {result.status} ({result.reason})")
    if not fp32_ok:
        for fmt in wanted:
            if fmt != "onnx":
                recorder.skip(fmt, f"{fp32_rel} failed its check")
        return summary
    reference_matches = val.matches(fp32_found)

    if EFFICIENT_NMS_FORMAT in wanted:
        log(f"exporting {EFFICIENT_NMS_FILE}")
        with timer.stage(EFFICIENT_NMS_FILE, "export"):
            trt_info = export_detector(
                detector, run / EFFICIENT_NMS_FILE, spec.shape, metadata, nms=NMS_TRT, opset=opset
            )
        result = check_efficient_nms(run / EFFICIENT_NMS_FILE)
        recorder.checked(
            EFFICIENT_NMS_FILE, result, TRT_ONNX_KIND, precision="fp32", flavour="efficientnms", **trt_info
        )
        log(f"  {EFFICIENT_NMS_FILE}: {result.status} ({result.reason})")

    if "fp16" in wanted:
        rel = ONNX_FORMATS["fp16"].file
        log(f"converting {rel}")
        with timer.stage(rel, "convert"):
            fp16_info = convert_fp16(
                fp32_path, run / rel, keep_float32=postprocess_nodes(onnx.load(str(fp32_path)))
            )
        with timer.stage(rel, "check"):
            result = _map_check(rel, "fp16", val, reference_matches, val.detect(run / rel))
        recorder.checked(
            rel, result, "onnx", precision="fp16", flavour="fp16", post_processing="fp32", **fp16_info
        )
        log(f"  {rel}: {result.status} ({result.reason})")

    int8_wanted = [f for f in ("int8", "int8-trt") if f in wanted]
    if int8_wanted:
        with timer.shared("read calibration images"):
            calibration_records, held_out_records = _split_training(
                data.train.images,
                calib_samples,
                held_out_samples if calib_method == "auto" or max_map_drop_int8 is not None else 0,
            )
            calibration = list(image_batches(calibration_records, size, batch_size))
            held_out = _Scorer(held_out_records, size, batch_size, classes) if held_out_records else None
        recorder.block["calibration"] = {
            "method": calib_method,
            "samples": len(calibration_records),
            "held_out": len(held_out_records),
            "seed": CALIBRATION_SEED,
        }
        for fmt in int8_wanted:
            rel = ONNX_FORMATS[fmt].file
            flavour = ONNX_FORMATS[fmt].flavour
            log(f"quantizing {rel}")
            with timer.stage(rel, "calibrate and choose"):
                description = _quantize(
                    fp32_path, run / rel, flavour, calibration, held_out, calib_method, max_map_drop_int8, log
                )
            with timer.stage(rel, "check"):
                result = _map_check(rel, "int8", val, reference_matches, val.detect(run / rel))
            recorder.checked(rel, result, "onnx", precision="int8", **description)
            log(f"  {rel}: {result.status} ({result.reason})")
    recorder.finish(timer, log)
    return summary
