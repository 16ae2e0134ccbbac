"""A detection run's export: the ExportTask export_run runs for the detection task (export.producing).

- the wrapper is the run's student detector with its post-processing (box decoding, score filter,
  NMS) inside, its reference the detections PyTorch finds on the check images;
- the check images are the run's held-out split (its test split under data.val_split) with their
  boxes, kept as `CheckImages.ground_truth` (export.detection_pipeline.DetectionTruth);
- the producers, in order: "onnx" (fp32, ONNX NonMaxSuppression; gated by box parity with PyTorch),
  "efficientnms" (fp32, TensorRT's EfficientNMS_TRT plugin; structure checked), "fp16", "int8",
  "int8-trt" (each gated by its mAP drop against fp32; int8 calibrated and mixed by mAP against
  the options' max_map_drop_int8) and "tensorrt" (export.engines);
- the engines: fp32 from the EfficientNMS file, fp16 and int8 from the fp16 and TensorRT int8 files,
  whose ONNX NonMaxSuppression TensorRT (>= 8.5) parses natively;
- layerwise (export.layerwise) compares the files on the first of the same check images, up to the
  head's outputs, and scores both with the check's mAP as deployed (`detection_layerwise`).

This module imports no torch: each producer imports the detection stack when it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx

from deploy.detection.coco_metric import coco_metrics
from deploy.detection.images import image_batches
from deploy.detection.outputs import Detections
from deploy.detection.parity import box_parity
from deploy.errors import UsageError
from deploy.fileio import sha256_file
from deploy.formats import EFFICIENT_NMS, ONNX_FORMATS, TENSORRT_FORMAT
from deploy.gates import evaluate_gates, gates_for
from deploy.manifest import Manifest, input_spec
from deploy.optional import optional_import
from deploy.run_layout import STUDENT_WEIGHTS
from deploy.status import Status
from deploy.tasks import DETECTION, TASKS
from export.check import CheckResult
from export.engines import produce_engines
from export.producing import (
    CheckImages,
    CheckRequest,
    EndMetric,
    ExportContext,
    ExportTask,
    FormatProducer,
    LayerwiseSetup,
)
from reviewkd.config import load_run_config

if TYPE_CHECKING:
    import torch

    from export.detection_pipeline import DetectionScorer, DetectionTruth
    from reviewkd.detection.engine import DetectionData
    from reviewkd.detection.models import Detector

_ACTION = "exporting a detection run"
FP32_FILE = ONNX_FORMATS["onnx"].file
# Images per batch of the checks and calibration: the detector's images are larger than a classifier's.
DETECTION_BATCH_SIZE = 16
DEFAULT_CALIB_SAMPLES = 256
# The ONNX file each engine precision is built from.
DETECTION_ENGINE_SOURCES: dict[str, str] = {
    "fp32": EFFICIENT_NMS.file,
    "fp16": ONNX_FORMATS["fp16"].file,
    "int8": ONNX_FORMATS["int8-trt"].file,
}


def load_detector(run: Path, manifest: Manifest) -> torch.nn.Module:
    """The run's student detector in eval mode, its weights checked against the manifest."""
    with optional_import(_ACTION):
        from reviewkd.detection.inference import load_run_detector

    return load_run_detector(run, manifest)


def detector_reference(
    model: torch.nn.Module, batches: Sequence[np.ndarray], device: str = "cpu"
) -> list[Detections]:
    """The detections PyTorch finds with the wrapper on every image of `batches`, in order, on `device`."""
    with optional_import(_ACTION):
        from reviewkd.detection.inference import torch_detections

    return torch_detections(cast("Detector", model), batches, device)


def held_out_scorer(
    run: Path, manifest: Manifest, data: DetectionData, count: int, batch_size: int, device: str = "cpu"
) -> DetectionScorer:
    """The first `count` images of the run's held-out split (`data.held_out`: its test split under
    data.val_split, else val) with their boxes, read at the manifest's input size: the images
    export checks the files on (running them on `device`), and layerwise compares them on."""
    with optional_import(_ACTION):
        from export.detection_pipeline import DetectionScorer

    spec = input_spec(manifest)
    records = data.held_out.images[:count]
    size = (spec.shape[1], spec.shape[2])
    scorer = DetectionScorer(records, size, batch_size, len(manifest["classes"]), device)
    if not scorer.records:
        raise UsageError(f"{run}: the validation split has no images to check the exported files on")
    return scorer


def detection_check_images(request: CheckRequest) -> tuple[CheckImages, str]:
    """Up to `check_samples` images of the run's held-out split with their boxes (`held_out_scorer`),
    the PyTorch detections on them, and the training images int8 calibrates on (module docstring)."""
    with optional_import(_ACTION):
        from export.detection_pipeline import DetectionTruth
        from reviewkd.detection.engine import build_detection_data

    with request.timer.shared("read check images"):
        data = build_detection_data(load_run_config(request.run))
        options = request.options
        checks = held_out_scorer(
            request.run, request.manifest, data, options.check_samples, options.batch_size,
            request.device.onnxruntime,
        )
    with request.timer.shared("reference detections (PyTorch)"):
        reference = detector_reference(request.model, checks.batches, request.device.torch)
    truth = DetectionTruth(checks, list(data.train.images))
    described = f"{len(checks.records)} validation images of the run"
    return CheckImages(checks.batches, reference, None, truth), described


def detection_layerwise(run: Path, manifest: Manifest, count: int) -> LayerwiseSetup:
    """What layerwise compares a detector's files on: the first `count` of export's check images
    (`held_out_scorer`), up to the head's raw outputs (class logits, box regression, centreness:
    export.detection.BODY_OUTPUTS), where the post-processing begins; and the mAP@[.5:.95] of both
    unmodified files, as deployed, on those images (the check's own scorer, pycocotools)."""
    with optional_import(_ACTION):
        from export.detection import BODY_OUTPUTS
        from reviewkd.detection.engine import build_detection_data

    data = build_detection_data(load_run_config(run))
    scorer = held_out_scorer(run, manifest, data, count, DETECTION_BATCH_SIZE)
    task = TASKS[DETECTION]

    def map_as_deployed(reference: Path, candidate: Path) -> EndMetric:
        return EndMetric(
            task.metric_label,
            scorer.map(scorer.detect(reference)),
            scorer.map(scorer.detect(candidate)),
            task.higher_is_better,
        )

    described = f"the first {len(scorer.records)} held-out images of the run, which export checks files on"
    return LayerwiseSetup(
        np.concatenate(scorer.batches), described, BODY_OUTPUTS, "head outputs", map_as_deployed
    )


def _truth(context: ExportContext) -> DetectionTruth:
    return cast("DetectionTruth", context.checks.ground_truth)


def _metadata(context: ExportContext) -> dict[str, Any]:
    """What every fp32 file embeds: the task, the classes, the input and the student it comes from."""
    manifest = context.manifest
    return {
        "task": DETECTION,
        "classes": manifest.get("classes", []),
        "input": manifest.get("input", {}),
        "student": {k: manifest.get("student", {}).get(k) for k in ("arch", "num_classes", "sha256")},
        "source_sha256": sha256_file(context.run / STUDENT_WEIGHTS),
    }


def _opset(context: ExportContext) -> int:
    """The options' opset, DEFAULT_OPSET where none was given."""
    with optional_import(_ACTION):
        from export.onnx_export import DEFAULT_OPSET

    return DEFAULT_OPSET if context.options.opset is None else context.options.opset


def _record(context: ExportContext, rel: str, result: CheckResult, kind: str, **meta: Any) -> bool:
    passed = context.recorder.checked(rel, result, kind, **meta)
    context.log(f"  {rel}: {result.status} ({result.reason})")
    return passed


def _fp32_matches(context: ExportContext) -> Any:
    """The fp32 file's detections matched to the ground truth: what every other file's mAP drop is
    paired against (computed by the fp32 producer, which always runs first)."""
    checks = _truth(context).checks
    return context.once("fp32 matches", lambda: checks.matches(checks.detect(context.run / FP32_FILE)))


def _produce_fp32(context: ExportContext, name: str) -> bool:
    """Export the detector with ONNX NonMaxSuppression (format "onnx"), gated by box parity with
    PyTorch on every check image."""
    with optional_import(_ACTION):
        from export.detection import export_detector
        from export.detection_pipeline import coco_detections

    checks = _truth(context).checks
    rel = ONNX_FORMATS[name].file
    info = _export_file(context, rel, export_detector)
    context.manifest["detection"] = info["detection"]
    reference: list[Detections] = context.checks.reference
    with context.timer.stage(rel, "check"):
        found, device = checks.detect_on(context.run / rel)
        parity = box_parity(reference, found)
        torch_map = checks.map(reference)
        coco = coco_metrics(checks.records, coco_detections(found), checks.classes)
        measured = {
            "parity": {"box_matched": 100.0 * parity.matched_fraction, **parity.as_dict()},
            "accuracy": {"map": 100.0 * coco.map, "ap50": 100.0 * coco.ap50, "torch_map": torch_map},
        }
        gates = evaluate_gates(measured, gates_for(TASKS[DETECTION].gates, "fp32"))
    passed = all(c["passed"] for c in gates)
    reason = (
        f"{parity.matched} of {parity.reference} torch detections matched (IoU >= {parity.min_iou},"
        f" score within {parity.max_score_diff:g}); mAP {100 * coco.map:.2f} (torch {torch_map:.2f})"
    )
    status = Status.OK if passed else Status.FAILED
    result = CheckResult(rel, "fp32", status, reason, {**measured, "gates": gates, "device": device})
    if passed:
        context.once("fp32 matches", lambda: checks.matches(found))
    return _record(context, rel, result, "onnx", precision="fp32", flavour="fp32", **info)


def _export_file(context: ExportContext, rel: str, export: Any, **options: Any) -> dict[str, Any]:
    """Export the run's detector to `rel` with `export` (export.detection.export_detector, passed in
    because that module needs torch) and `options` (the NMS form), timed as the file's export stage."""
    context.log(f"exporting {rel}")
    with context.timer.stage(rel, "export"):
        info: dict[str, Any] = export(
            cast("Detector", context.model),
            context.run / rel,
            input_spec(context.manifest).shape,
            _metadata(context),
            opset=_opset(context),
            **options,
        )
    return info


def _produce_efficient_nms(context: ExportContext, name: str) -> bool:
    """Export the detector with TensorRT's EfficientNMS_TRT plugin (format "efficientnms"), the fp32
    engine's source; ONNX Runtime cannot run it, so its structure is checked."""
    with optional_import(_ACTION):
        from export.detection import NMS_TRT, export_detector
        from export.detection_pipeline import check_efficient_nms

    rel = EFFICIENT_NMS.file
    info = _export_file(context, rel, export_detector, nms=NMS_TRT)
    result = check_efficient_nms(context.run / rel)
    return _record(
        context, rel, result, EFFICIENT_NMS.kind, precision="fp32", flavour=EFFICIENT_NMS.flavour, **info
    )


def _produce_fp16(context: ExportContext, name: str) -> bool:
    """Convert the network to fp16, the post-processing kept fp32 (format "fp16"), gated by its mAP drop."""
    with optional_import(_ACTION):
        from export.detection import postprocess_nodes
        from export.detection_pipeline import map_check
        from export.precision import convert_fp16

    checks = _truth(context).checks
    rel, fp32_path = ONNX_FORMATS[name].file, context.run / FP32_FILE
    context.log(f"converting {rel}")
    with context.timer.stage(rel, "convert"):
        kept = postprocess_nodes(onnx.load(str(fp32_path)))
        info = convert_fp16(fp32_path, context.run / rel, keep_float32=kept)
    with context.timer.stage(rel, "check"):
        found, device = checks.detect_on(context.run / rel)
        result = map_check(rel, "fp16", checks, _fp32_matches(context), found, device)
    return _record(
        context, rel, result, "onnx", precision="fp16", flavour="fp16", post_processing="fp32", **info
    )


def _calibration(context: ExportContext) -> tuple[list[np.ndarray], Any]:
    """The int8 flavours' shared images: calibration batches and the held-out scorer (None when
    nothing judges int8), recorded as manifest["export"]["calibration"]."""
    with optional_import(_ACTION):
        from export.detection_pipeline import (
            CALIBRATION_SEED,
            DEFAULT_HELD_OUT,
            DetectionScorer,
            split_training,
        )

    options, checks = context.options, _truth(context).checks
    judged = options.calib_method == "auto" or options.max_map_drop_int8 is not None
    held_out_samples = options.held_out_samples if options.held_out_samples is not None else DEFAULT_HELD_OUT
    size = (checks.batches[0].shape[2], checks.batches[0].shape[3])
    with context.timer.shared("read calibration images"):
        calibration_records, held_out_records = split_training(
            _truth(context).train, options.calib_samples, held_out_samples if judged else 0
        )
        calibration = list(image_batches(calibration_records, size, options.batch_size))
        held_out = None
        if held_out_records:
            held_out = DetectionScorer(
                held_out_records, size, options.batch_size, checks.classes, context.device.onnxruntime
            )
    context.recorder.block["calibration"] = {
        "method": options.calib_method,
        "samples": len(calibration_records),
        "held_out": len(held_out_records),
        "seed": CALIBRATION_SEED,
    }
    return calibration, held_out


def _produce_int8(context: ExportContext, name: str) -> bool:
    """Quantize the network to one int8 flavour ("int8", "int8-trt") with the calibration method
    and float layers chosen by held-out mAP, gated by its mAP drop."""
    with optional_import(_ACTION):
        from export.detection_pipeline import map_check, quantize_detector

    checks = _truth(context).checks
    calibration, held_out = context.once("int8 calibration", lambda: _calibration(context))
    fmt = ONNX_FORMATS[name]
    context.log(f"quantizing {fmt.file}")
    with context.timer.stage(fmt.file, "calibrate and choose"):
        description = quantize_detector(
            context.run / FP32_FILE,
            context.run / fmt.file,
            fmt.flavour,
            calibration,
            held_out,
            context.options.calib_method,
            context.options.max_map_drop_int8,
            context.log,
        )
    with context.timer.stage(fmt.file, "check"):
        found, device = checks.detect_on(context.run / fmt.file)
        result = map_check(fmt.file, "int8", checks, _fp32_matches(context), found, device)
    return _record(context, fmt.file, result, "onnx", precision="int8", **description)


# The detector's producers, in export order: fp32 first, every other ONNX file made from it.
DETECTION_PRODUCERS: dict[str, FormatProducer] = {
    "onnx": FormatProducer(_produce_fp32),
    EFFICIENT_NMS.name: FormatProducer(_produce_efficient_nms, made_from="onnx"),
    "fp16": FormatProducer(_produce_fp16, made_from="onnx"),
    "int8": FormatProducer(_produce_int8, made_from="onnx"),
    "int8-trt": FormatProducer(_produce_int8, made_from="onnx"),
    TENSORRT_FORMAT: FormatProducer(produce_engines),
}

DETECTION_EXPORT = ExportTask(
    load_detector,
    detector_reference,
    DETECTION_PRODUCERS,
    check_images=detection_check_images,
    engine_sources=DETECTION_ENGINE_SOURCES,
    calib_samples=DEFAULT_CALIB_SAMPLES,
    batch_size=DETECTION_BATCH_SIZE,
    layerwise=detection_layerwise,
)
