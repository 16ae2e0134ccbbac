"""The export stage end to end: a run's student -> ONNX flavours (-> TensorRT), checked and recorded.

`export_run(RUN)` reads RUN/manifest.json and RUN/student.safetensors, writes RUN/export/*, checks
each file against the PyTorch student on the run's validation images, and records every file that
passed in the manifest (sha256, size, kind, precision, flavour). A file that fails its gate is
renamed `<file>.failed` and listed under manifest["export"]["failed"]; the other formats still run.
`export_model(...)` first lays out a run-like folder for a zoo model trained elsewhere.

The formats and their files are deploy.formats' registry:
    export/student.onnx          fp32                       format "onnx"
    export/student.fp16.onnx     fp16, fp32 I/O             format "fp16"
    export/student.int8.onnx     uint8-activation Q/DQ      format "int8"      (fastest on ORT CPU)
    export/student.int8.trt.onnx symmetric int8 Q/DQ        format "int8-trt"  (for TensorRT)
    export/student.uint8.onnx    fp32, uint8 NHWC input     --bake-preprocessing
    export/student.<p>.plan(.json)  TensorRT engines        format "tensorrt"  (fp32, fp16, int8)

Each format is made by its producer (export.producing): CLASSIFICATION_PRODUCERS below, one per
format in the registry's order, registered for the task in EXPORT_TASKS; export_run plans the
requested formats and those they are made from, and runs their producers in turn.

`--formats tensorrt` alone builds engines from the run's already checked ONNX files and needs
neither torch nor the student: that is the path of a serving device (a Jetson) with the edge
install. Every other format loads the student with torch, which this module imports only then.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import atomic_output, ensure_writable_dir, sha256_file
from deploy.formats import (
    EFFICIENT_NMS,
    EXPORT_FORMAT_NAMES,
    ONNX_FORMATS,
    TENSORRT_FORMAT,
    UINT8_INPUT,
)
from deploy.gpu import probe_gpu
from deploy.manifest import (
    MAX_IMAGE_SIDE,
    Manifest,
    input_spec,
    model_block,
    new_manifest,
    read_manifest,
    record_artifact,
    write_manifest,
)
from deploy.optional import optional_import, require_installed
from deploy.run_lock import locks_run
from deploy.tasks import CLASSIFICATION, DETECTION, task_of
from deploy.trt_sidecar import tensorrt_available
from export.check import UINT8_INPUT as UINT8_CHECK
from export.check import CheckDevice, check_file, resolve_check_device, run_onnx
from export.detection_producing import DETECTION_EXPORT
from export.engines import build_engines, produce_engines
from export.producing import (
    DEFAULT_MAX_MAP_DROP_INT8,
    BatchSource,
    CheckImages,
    CheckRequest,
    ExportContext,
    ExportOptions,
    ExportRecorder,
    ExportSummary,
    ExportTask,
    FormatProducer,
    LayerwiseSetup,
    TensorRTOptions,
)
from export.timing import StageTimer
from reviewkd.config import Config, DataConfig, ModelConfig, save_config, validate

if TYPE_CHECKING:
    import torch

    from export.calibration import CalibrationData
    from export.precision import ActivationStatistics

STUDENT_FILE = run_layout.STUDENT_WEIGHTS
FP32_FILE = ONNX_FORMATS["onnx"].file
RANDOM_CHECK_IMAGES = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_formats(text: str | Sequence[str] | None) -> list[str] | None:
    """Turn "onnx,fp16" (or a list) into known format names; None means the default set."""
    if text is None:
        return None
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in EXPORT_FORMAT_NAMES]
    if unknown or not names:
        raise UsageError(
            f"--formats {','.join(names)}: expected a comma-separated subset of"
            f" {','.join(EXPORT_FORMAT_NAMES)}"
        )
    return list(dict.fromkeys(names))


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT and a GPU are here to build engines, with the reason when not."""
    ok, reason = tensorrt_available()
    if not ok:
        return False, reason
    probe = probe_gpu()
    if probe.gpu is None:
        return (
            False,
            "TensorRT is installed but no CUDA GPU is usable; engines must be built on the target GPU "
            f"({probe.describe_failure()})",
        )
    return True, reason


def load_student(run: Path, manifest: Manifest) -> torch.nn.Module:
    """The run's student, stripped of its training-only parts: classification's export wrapper.

    UsageError when the weights are missing, the manifest lacks arch or num_classes, or the
    weights' sha256 differs from the manifest's.
    """
    with optional_import("exporting ONNX files"):
        from export.onnx_export import strip_student
        from reviewkd.models import create_model

    student_path = run / STUDENT_FILE
    if not student_path.is_file():
        raise UsageError(
            f"{student_path}: no student weights; expected a run directory written by reviewkd distill"
        )
    info = model_block(manifest, "student")
    if not info.arch or not info.num_classes:
        raise UsageError(f"{run / run_layout.MANIFEST}: the student block lacks arch or num_classes")
    if info.sha256 and info.sha256 != sha256_file(student_path):
        raise UsageError(
            f"{student_path}: sha256 differs from the manifest's; the weights changed after training"
        )
    return strip_student(create_model(info.arch, info.num_classes, weights=student_path))


def run_batches(run: Path) -> BatchSource:
    """The run's own images by split (reviewkd.data.iter_run_batches over its config.yaml)."""

    def source(split: str, batch_size: int, limit: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        with optional_import("exporting ONNX files"):
            from reviewkd.data import iter_run_batches

        return iter_run_batches(run, split, batch_size, limit)

    return source


def torch_logits(model: torch.nn.Module, batches: Sequence[np.ndarray], device: str = "cpu") -> np.ndarray:
    """The model's outputs on each float32 NCHW batch, concatenated (classification's reference),
    computed on `device` ("cpu" or "cuda": in full fp32, TF32 off, reviewkd.runtime.exact_fp32).

    Computed on a channels-last copy of the model, the inputs channels-last too: the same weights
    and arithmetic in another memory layout, which oneDNN runs much faster on depthwise convolutions
    (a mobilenet_v3_small's reference on 10,000 CIFAR images: 2.8 s of CPU against 11.2; a
    ResNet-56's: the same; benchmarks/RESULTS.md). The logits differ from the contiguous layout's by
    float rounding (the ResNet-56's fp32 file then differs from them by 2.48e-5 at most instead of
    2.29e-5, under the 1e-4 gate); `model` itself is left as it was.
    """
    with optional_import("exporting ONNX files"):
        import torch

        from reviewkd.runtime import exact_fp32

    layout = torch.channels_last
    copied = copy.deepcopy(model).to(device).to(memory_format=layout)

    def logits(batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(batch).to(device).contiguous(memory_format=layout)
        return copied(inputs).float().cpu().numpy()

    with torch.no_grad(), exact_fp32():
        return np.concatenate([logits(b) for b in batches])


def check_device_here(requested: str) -> CheckDevice:
    """`resolve_check_device` of `--check-device requested` with PyTorch's own probe
    (reviewkd.runtime.torch_cuda_missing): UsageError for an unknown value, MissingDependencyError
    for "cuda" where PyTorch or ONNX Runtime cannot compute on the GPU."""
    with optional_import("exporting ONNX files"):
        from reviewkd.runtime import torch_cuda_missing

    return resolve_check_device(requested, torch_cuda_missing)


def classification_layerwise(run: Path, manifest: Manifest, count: int) -> LayerwiseSetup:
    """What layerwise compares a classifier's files on: `count` images spread over the run's
    validation split (reviewkd.data.iter_run_batches), up to the logits; the logits say it all."""
    with optional_import("reviewkd layerwise"):
        from export.onnx_export import OUTPUT_NAME

    batches = [images for images, _ in run_batches(run)("val", 64, count)]
    if not batches:
        raise UsageError(f"{run}: the validation split has no images to compare the files on")
    images = np.concatenate(batches)[:count]
    return LayerwiseSetup(images, f"{len(images)} validation images of the run", (OUTPUT_NAME,), "logits")


def _check_and_record(
    context: ExportContext,
    rel: str,
    check_as: str,
    checks: CheckImages | None = None,
    **meta: Any,
) -> bool:
    """Check the ONNX file `rel` as precision `check_as` on `checks` (None: the export's check
    images), record it (kept or renamed .failed) with `meta`, log the verdict; return passed."""
    images = checks or context.checks
    with context.timer.stage(rel, "check"):
        result = check_file(
            context.run / rel,
            check_as,
            images.batches,
            images.reference,
            images.labels,
            context.device.onnxruntime,
        )
    passed = context.recorder.checked(rel, result, "onnx", **meta)
    context.log(f"  {rel}: {result.status} ({result.reason})")
    return passed


def _produce_fp32(context: ExportContext, name: str) -> bool:
    """Trace the wrapper to the fp32 ONNX file (format "onnx"), every other flavour's source."""
    with optional_import("exporting ONNX files"):
        from export.onnx_export import DEFAULT_OPSET, export_fp32

    manifest, opset = context.manifest, context.options.opset
    recorded = model_block(manifest, "student")
    metadata = {
        "classes": manifest.get("classes", []),
        "input": manifest.get("input", {}),
        "student": {"arch": recorded.arch, "num_classes": recorded.num_classes, "sha256": recorded.sha256},
        "source_sha256": sha256_file(context.run / STUDENT_FILE),
    }
    rel = ONNX_FORMATS[name].file
    context.log(f"exporting {rel}")
    with context.timer.stage(rel, "export"):
        info = export_fp32(
            context.model,
            context.run / rel,
            input_spec(manifest).shape,
            metadata,
            opset=DEFAULT_OPSET if opset is None else opset,
        )
    context.recorder.block["weights"] = {
        k: v for k, v in info.items() if k not in ("opset", "exporter", "optimizer")
    }
    return _check_and_record(context, rel, "fp32", precision="fp32", flavour="fp32", **info)


def _produce_fp16(context: ExportContext, name: str) -> bool:
    """Convert the fp32 file to fp16 compute with fp32 I/O (format "fp16")."""
    with optional_import("exporting ONNX files"):
        from export.precision import convert_fp16

    rel = ONNX_FORMATS[name].file
    context.log(f"converting {rel}")
    with context.timer.stage(rel, "convert"):
        info = convert_fp16(context.run / FP32_FILE, context.run / rel)
    return _check_and_record(context, rel, "fp16", precision="fp16", flavour="fp16", **info)


def _int8_needs_data(context: ExportContext) -> str | None:
    """Why int8 cannot run: calibration and its gate need images."""
    if context.has_data:
        return None
    return "int8 needs calibration and validation images: pass --data IMAGEFOLDER"


@dataclass(frozen=True)
class Int8Inputs:
    """What every int8 flavour of one export shares: the training images it calibrates on and is
    judged on, the fp32 file's outputs on the held-out part (one pass for every candidate and
    mixed-precision search), and the calibration images' activation statistics (one pass for every
    method and flavour)."""

    data: CalibrationData
    held_out_reference: np.ndarray | None
    statistics: ActivationStatistics


def _int8_inputs(context: ExportContext) -> Int8Inputs:
    """Read and compute the export's Int8Inputs, each pass timed as a shared stage; the images are
    recorded as manifest["export"]["calibration"]."""
    with optional_import("exporting ONNX files"):
        from export.calibration import AUTO, DEFAULT_HELD_OUT, split_training_images
        from export.mixed_precision import BUDGET_HELD_OUT
        from export.precision import ActivationStatistics

    options = context.options
    # The budget is confirmed on an interval: that may take many held-out images (mixed_precision).
    if options.max_top1_drop_int8 is not None:
        held_out = BUDGET_HELD_OUT
    else:
        held_out = DEFAULT_HELD_OUT if options.calib_method == AUTO else 0
    context.log(f"calibrating int8 on up to {options.calib_samples} training images ({options.calib_method})")
    with context.timer.shared("read calibration images"):
        data = split_training_images(
            context.source("train", options.batch_size, options.calib_samples + held_out),
            options.calib_samples,
            held_out,
            seed=context.data_seed,
        )
    reference = None
    if data.held_out:
        with context.timer.shared("held-out reference logits (fp32 ONNX)"):
            reference = run_onnx(context.run / FP32_FILE, data.held_out, context.device.onnxruntime)
    statistics = ActivationStatistics(context.run / FP32_FILE, data.calibration)
    context.resources.enter_context(statistics)
    with context.timer.shared("calibration statistics"):
        statistics.collect()
    context.recorder.block["calibration"] = {"method": options.calib_method, **data.describe()}
    return Int8Inputs(data, reference, statistics)


def _produce_int8(context: ExportContext, name: str) -> bool:
    """Calibrate and quantize one int8 flavour (formats "int8", "int8-trt"), within the budget."""
    with optional_import("exporting ONNX files"):
        from export.calibration import quantize_calibrated

    shared = context.once("int8 inputs", lambda: _int8_inputs(context))
    fmt = ONNX_FORMATS[name]
    context.log(f"quantizing {fmt.file}")
    desc = quantize_calibrated(
        context.run / FP32_FILE,
        context.run / fmt.file,
        shared.data,
        flavour=fmt.flavour,
        method=context.options.calib_method,
        max_top1_drop=context.options.max_top1_drop_int8,
        held_out_reference=shared.held_out_reference,
        statistics=shared.statistics,
        clock=context.timer.clock(fmt.file),
        device=context.device.onnxruntime,
    )
    search = desc.get("mixed_precision", {})
    floats = [layer["module"] for layer in search.get("float_layers", [])]
    method = desc["calibration"]["method"]
    judged = f" ({len(search['steps'])} files judged)" if search else ""
    context.log(f"  calibration: {method}; float layers: {', '.join(floats) or 'none'}{judged}")
    return _check_and_record(context, fmt.file, "int8", precision="int8", **desc)


def _produce_uint8_input(context: ExportContext, name: str) -> bool:
    """Bake the preprocessing into the fp32 file: uint8 NHWC input (--bake-preprocessing), checked
    on the check images rounded to uint8 against the wrapper's own pass on them."""
    with optional_import("exporting ONNX files"):
        from export.preprocessing import bake_preprocessing, to_uint8_nhwc

    spec = input_spec(context.manifest)
    rel = UINT8_INPUT.file
    context.log(f"baking preprocessing into {rel}")
    with context.timer.stage(rel, "bake"):
        info = bake_preprocessing(context.run / FP32_FILE, context.run / rel, spec.mean, spec.std)
    with context.timer.stage(rel, "reference logits (PyTorch)"):
        pairs = [to_uint8_nhwc(b, spec.mean, spec.std) for b in context.checks.batches]
        reference = torch_logits(context.model, [p[1] for p in pairs], context.device.torch)
    rounded = CheckImages([p[0] for p in pairs], reference, context.checks.labels)
    return _check_and_record(
        context, rel, UINT8_CHECK, rounded, precision=UINT8_INPUT.precision, flavour=UINT8_INPUT.flavour,
        **info,
    )


# Classification's producers, in the registry's order (deploy.formats): the ONNX flavours, the
# uint8-input file, then the engines built from them.
CLASSIFICATION_PRODUCERS: dict[str, FormatProducer] = {
    "onnx": FormatProducer(_produce_fp32),
    "fp16": FormatProducer(_produce_fp16, made_from="onnx"),
    "int8": FormatProducer(_produce_int8, made_from="onnx", unavailable=_int8_needs_data),
    "int8-trt": FormatProducer(_produce_int8, made_from="onnx", unavailable=_int8_needs_data),
    UINT8_INPUT.name: FormatProducer(_produce_uint8_input, made_from="onnx"),
    TENSORRT_FORMAT: FormatProducer(produce_engines),
}

# Each task's export (export.producing), by deploy.tasks name; a task missing here cannot be exported.
EXPORT_TASKS: dict[str, ExportTask] = {
    CLASSIFICATION: ExportTask(
        load_student, torch_logits, CLASSIFICATION_PRODUCERS, layerwise=classification_layerwise
    ),
    DETECTION: DETECTION_EXPORT,
}


def export_task(run: Path, manifest: Manifest) -> ExportTask:
    """The ExportTask of the run's task; UsageError naming the run for a task export cannot make."""
    spec = task_of(manifest, str(run / run_layout.MANIFEST))
    if spec.name not in EXPORT_TASKS:
        raise UsageError(f"{run}: a {spec.name} run; export is not available: {spec.deploy_skip_reason}")
    return EXPORT_TASKS[spec.name]


def _check_options(options: ExportOptions) -> ExportOptions:
    """UsageError for an export option out of range, before anything is read or written; returns
    the options with the opset resolved (None: DEFAULT_OPSET), as the manifest records it."""
    with optional_import("exporting ONNX files"):
        from export.calibration import METHOD_CHOICES
        from export.onnx_export import DEFAULT_OPSET, check_opset

    if options.opset is not None:
        check_opset(options.opset)
    if options.calib_method not in METHOD_CHOICES:
        raise UsageError(
            f"--calib-method {options.calib_method!r}: expected one of {', '.join(METHOD_CHOICES)}"
        )
    for name, value in (
        ("--calib-samples", options.calib_samples),
        ("check_samples", options.check_samples),
        ("batch_size", options.batch_size),
    ):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if options.held_out_samples is not None and options.held_out_samples < 0:
        raise UsageError(f"held_out_samples must be >= 0, got {options.held_out_samples}")
    return dataclasses.replace(options, opset=DEFAULT_OPSET if options.opset is None else options.opset)


def task_formats(run: Path, task: ExportTask, wanted: Sequence[str]) -> None:
    """UsageError naming the run when it asks for a format its task does not export."""
    unknown = [name for name in wanted if name not in task.producers]
    if unknown:
        exported = ",".join(name for name in task.producers if name != UINT8_INPUT.name)
        what = "--bake-preprocessing" if unknown == [UINT8_INPUT.name] else f"--formats {','.join(unknown)}"
        raise UsageError(f"{what}: {run} is a run whose task exports {exported}")


def _resolve_formats(
    task: ExportTask, wanted: list[str] | None, recorder: ExportRecorder
) -> tuple[list[str], str | None]:
    """The formats to export (None: every format of the task but the opt-in uint8-input file, with
    TensorRT only where it can build) and why TensorRT cannot build engines here (None: it can;
    only asked when TensorRT may be wanted)."""
    trt_ok, trt_reason = tensorrt_status() if wanted is None or TENSORRT_FORMAT in wanted else (True, "")
    if wanted is None:
        wanted = [
            name
            for name in task.producers
            if name not in (UINT8_INPUT.name, TENSORRT_FORMAT) or (name == TENSORRT_FORMAT and trt_ok)
        ]
        if not trt_ok:
            recorder.skip(TENSORRT_FORMAT, f"not requested by default: {trt_reason}")
    return wanted, None if trt_ok else trt_reason


def labelled_check_images(request: CheckRequest, task: ExportTask) -> tuple[CheckImages, str]:
    """The check images of a task without its own `check_images` (classification's), with the
    wrapper's reference outputs, and a line saying what they are: up to `check_samples` labelled
    validation images from the source, or without one RANDOM_CHECK_IMAGES random inputs (no labels)."""
    run, source, timer = request.run, request.source, request.timer
    check_samples, batch_size = request.options.check_samples, request.options.batch_size
    if source is not None:
        with timer.shared("read check images"):
            pairs = list(source("val", batch_size, check_samples))
        if not pairs:
            raise UsageError(f"{run}: the validation split has no images to check the exported files on")
        batches = [p[0].astype(np.float32) for p in pairs]
        labels: np.ndarray | None = np.concatenate([p[1] for p in pairs])
        described = (
            f"{sum(len(b) for b in batches)} validation images of the run (a sequential check, int8's"
            " or fp16's, stops once its interval resolves its gate and says how many it used)"
        )
    else:
        count = min(check_samples, RANDOM_CHECK_IMAGES)
        shape = input_spec(request.manifest).shape
        batches = [np.random.default_rng(0).standard_normal((count, *shape), dtype=np.float32)]
        labels = None
        described = f"{count} random inputs (no image data: int8 skipped, accuracy not measured)"
    with timer.shared("reference logits (PyTorch)"):
        reference = task.reference(request.model, batches, request.device.torch)
    return CheckImages(batches, reference, labels), described


# The run-relative file of each ONNX format of the registry, by name.
FORMAT_FILES: dict[str, str] = {
    spec.name: spec.file for spec in (*ONNX_FORMATS.values(), UINT8_INPUT, EFFICIENT_NMS)
}


def _run_producers(
    context: ExportContext, producers: Mapping[str, FormatProducer], planned: Sequence[str]
) -> None:
    """Run each planned format's producer in order; a format whose source file failed, or that
    cannot run in this export, is skipped with the reason."""
    for name in planned:
        producer = producers[name]
        reason = producer.unavailable(context)
        source = producer.made_from
        if reason is None and source is not None and not context.passed[source]:
            source_file = FORMAT_FILES.get(source, source)
            skipped = context.recorder.summary.skipped.get(source)
            reason = f"{source_file} " + (f"was not made ({skipped})" if skipped else "failed its check")
        if reason is not None:
            context.recorder.skip(name, reason)
            context.passed[name] = False
            continue
        context.passed[name] = producer.produce(context, name)


@locks_run("export")
def export_run(
    run_dir: str | os.PathLike[str],
    formats: Sequence[str] | None = None,
    *,
    calib_samples: int | None = None,
    calib_method: str = "auto",
    max_top1_drop_int8: float | None = 0.3,
    max_map_drop_int8: float | None = DEFAULT_MAX_MAP_DROP_INT8,
    held_out_samples: int | None = None,
    bake_preprocessing: bool = False,
    check_samples: int = 10_000,
    batch_size: int | None = None,
    opset: int | None = None,
    tensorrt: TensorRTOptions | None = None,
    check_device: str = "auto",
    batches: BatchSource | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    timer: StageTimer | None = None,
) -> ExportSummary:
    """Export the run's student to `formats` (default: every ONNX flavour, plus TensorRT if here).

    The run's task (manifest "task") picks its ExportTask from EXPORT_TASKS: its wrapper, its
    reference outputs and its producers, one per format (export.producing). The requested formats
    and those they are made from run in the producers' order.

    Args:
        run_dir: a run directory with manifest.json and student.safetensors.
        formats: names from EXPORT_FORMAT_NAMES that the run's task exports (others: UsageError);
            None is every format of the task but uint8, with "tensorrt" only where TensorRT and a
            GPU are available. Any ONNX flavour also writes the fp32 file it is made from.
        calib_samples, calib_method: int8 calibration on this many training images (None: the
            task's default, 512 for classifiers, 256 for detectors), with this method of
            export.calibration.METHOD_CHOICES ("auto": the best, judged on the next held-out
            training images).
        max_top1_drop_int8: a classifier's budget: points of top-1 the int8 files may lose against
            fp32 on those held-out images before their most sensitive layers stay in float
            (export.mixed_precision); None quantizes every layer.
        max_map_drop_int8: a detector's budget, in mAP points (export.detection_pipeline).
        held_out_samples: the held-out training images that judge int8 (None: the task's default).
        bake_preprocessing: also write export/student.uint8.onnx (uint8 NHWC input).
        check_samples: validation images the checks run on (default 10,000: all of a CIFAR test set;
            the int8 gate judges the paired interval of the drop, which needs images).
        batch_size: images per batch of the checks and calibration (None: the task's default).
        opset: the ONNX opset (None: export.onnx_export.DEFAULT_OPSET).
        check_device: where the PyTorch references and the files' checks, scores and searches
            compute, one of export.check.CHECK_DEVICES (`resolve_check_device`: "auto" puts each on
            a CUDA GPU where it can run there); recorded as manifest["export"]["check_device"].
        batches: the image source; None reads the run's data with reviewkd.data.iter_run_batches,
            or, for a run without config.yaml (a --model export without --data), checks on random
            inputs and skips int8.
        log: receives one line per step, and at the end the timing table (export.timing).
        timer: a timer already running (export_model's, which timed laying out the folder); None
            starts one here. Its table goes to the summary's `timing` and manifest["export"]["timing"].

    Returns the summary; call its raise_for_status() to turn failures into exit codes.

    Raises:
        UsageError: no student, a bad manifest, an unwritable export folder, a bad option, a task
            export cannot make.
        MissingDependencyError: an ONNX format was asked for and torch is not installed, or
            check_device "cuda" where PyTorch or ONNX Runtime cannot use a CUDA GPU.
    """
    timer = timer or StageTimer()
    run = Path(run_dir)
    wanted = list(formats) if formats is not None else None
    if wanted is not None:
        parse_formats(wanted)
    if wanted == [TENSORRT_FORMAT]:
        return export_engines(run, tensorrt, log, timer=timer)
    require_installed("torch", "exporting ONNX files (any --formats but tensorrt)")
    with optional_import("exporting ONNX files"):
        from reviewkd.data import DATA_SEED

    manifest = read_manifest(run)
    task = export_task(run, manifest)
    requested_extra = [UINT8_INPUT.name] if bake_preprocessing else []
    task_formats(run, task, (wanted or []) + requested_extra)
    options = _check_options(
        ExportOptions(
            calib_samples=task.calib_samples if calib_samples is None else calib_samples,
            calib_method=calib_method,
            max_top1_drop_int8=max_top1_drop_int8,
            batch_size=task.batch_size if batch_size is None else batch_size,
            opset=opset,
            tensorrt=tensorrt or TensorRTOptions(),
            check_samples=check_samples,
            max_map_drop_int8=max_map_drop_int8,
            held_out_samples=held_out_samples,
            check_device=check_device,
        )
    )
    device = check_device_here(options.check_device)  # before anything is written: it may refuse
    model = task.load_model(run, manifest)
    ensure_writable_dir(run / run_layout.EXPORT_DIR)
    summary = ExportSummary(run)
    recorder = ExportRecorder(run, manifest, summary)
    wanted, tensorrt_missing = _resolve_formats(task, wanted, recorder)
    has_data = batches is not None or run_layout.run_path(run, run_layout.CONFIG).is_file()
    source = batches if batches is not None else run_batches(run)
    log(f"PyTorch reference on {device.torch}; the ONNX files checked on {device.onnxruntime}")
    for note in device.notes:
        log(f"  {note}")
    request = CheckRequest(run, manifest, model, source if has_data else None, options, timer, device)
    if task.check_images is not None:
        checks, summary.check_data = task.check_images(request)
    else:
        checks, summary.check_data = labelled_check_images(request, task)
    recorder.block.update(
        {
            "check_data": summary.check_data,
            "check_device": device.describe(),
            "opset": options.opset,
            "formats": wanted,
            "calibration": None,
        }
    )
    context = ExportContext(
        run, manifest, model, recorder, timer, log, options, checks, source, has_data,
        data_seed=DATA_SEED if batches is None else None,
        tensorrt_missing=tensorrt_missing,
        device=device,
        engine_sources=task.engine_sources,
    )
    requested = wanted + requested_extra
    with context.resources:
        _run_producers(context, task.producers, task.plan(requested))
    recorder.finish(timer, log)
    return summary


def export_engines(
    run_dir: str | os.PathLike[str],
    tensorrt: TensorRTOptions | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    *,
    timer: StageTimer | None = None,
) -> ExportSummary:
    """Build one TensorRT engine per precision from the run's checked ONNX files.

    Needs neither torch nor the student: each ONNX file passed its check against the student when
    it was exported, and its sha256 is verified against the manifest before the build. Without
    TensorRT or a GPU the summary carries the missing dependency (exit 3). Each build is timed
    (stage "tensorrt build") on `timer` (None: a new one), and the table printed at the end.
    """
    timer = timer or StageTimer()
    run = Path(run_dir)
    manifest = read_manifest(run)
    summary = ExportSummary(run, check_data="the ONNX files' checks at export (engines are built from them)")
    recorder = ExportRecorder(run, manifest, summary)
    trt_ok, trt_reason = tensorrt_status()
    if not trt_ok:
        summary.missing_dependency = f"--formats tensorrt: {trt_reason}"
        recorder.skip(TENSORRT_FORMAT, trt_reason)
    else:
        sources = export_task(run, manifest).engine_sources
        ensure_writable_dir(run / run_layout.EXPORT_DIR)
        build_engines(run, manifest, recorder, tensorrt or TensorRTOptions(), log, timer, sources)
    recorder.finish(timer, log)
    return summary


def infer_num_classes(model_name: str, weights: str | os.PathLike[str]) -> int:
    """Read the number of classes off a weights file: the classifier rows of `model_name`."""
    with optional_import("exporting ONNX files"):
        from reviewkd.models import create_model, read_state_dict

    state = read_state_dict(weights)
    probe = create_model(model_name, 1).state_dict()
    found = {
        int(state[k].shape[0])
        for k, v in probe.items()
        if k in state
        and v.ndim >= 1
        and v.shape[0] == 1
        and state[k].shape[1:] == v.shape[1:]
        and state[k].shape[0] != 1
    }
    if len(found) != 1:
        raise UsageError(f"{weights}: cannot tell the number of classes of {model_name}; pass --num-classes")
    return found.pop()


@locks_run("export", run_arg="out_dir", create=True)
def export_model(
    model_name: str,
    weights: str | os.PathLike[str],
    input_shape: tuple[int, int, int],
    out_dir: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    **export_options: Any,
) -> ExportSummary:
    """Export a zoo model trained elsewhere: lay out `out_dir` like a run, then export_run it.

    `out_dir` gets student.safetensors (the weights re-saved), manifest.json and, with `data_dir`
    (an ImageFolder tree with train/ and val/ or test/), a config.yaml so that calibration and
    checks use those images. Without data the checks run on random inputs and int8 is skipped.
    `export_options` go to export_run. The timing table starts here: laying out the folder
    (building the model, re-saving its weights) is the student file's "lay out" stage.
    """
    timer = StageTimer()
    require_installed("torch", "exporting a zoo model")
    out = Path(out_dir)
    if len(input_shape) != 3 or any(d < 1 for d in input_shape) or max(input_shape[1:]) > MAX_IMAGE_SIDE:
        raise UsageError(
            f"--input-shape {input_shape}: expected C,H,W with positive sizes,"
            f" H and W at most {MAX_IMAGE_SIDE}"
        )
    if export_options.get("opset") is not None:
        with optional_import("exporting ONNX files"):
            from export.onnx_export import check_opset

        check_opset(export_options["opset"])  # before DIR is laid out, as export_run would after
    # Before DIR is laid out: export_run resolves it again, and must not fail after the layout.
    check_device_here(export_options.get("check_device", "auto"))
    _check_model_out(out)
    ensure_writable_dir(out)
    with timer.stage(STUDENT_FILE, "lay out"):
        _lay_out_run(out, model_name, weights, input_shape, num_classes, data_dir, mean, std)
    return export_run(out, timer=timer, **export_options)


def _lay_out_run(
    out: Path,
    model_name: str,
    weights: str | os.PathLike[str],
    input_shape: tuple[int, int, int],
    num_classes: int | None,
    data_dir: str | os.PathLike[str] | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> None:
    """Write out/student.safetensors (the zoo model's weights, stripped), manifest.json and, with
    `data_dir`, config.yaml: a folder export_run can export."""
    with optional_import("exporting ONNX files"):
        import torch
        from safetensors.torch import save_file

        from export.onnx_export import strip_student
        from reviewkd.models import create_model

    classes_n = num_classes if num_classes is not None else infer_num_classes(model_name, weights)
    model = strip_student(create_model(model_name, classes_n, weights=weights))
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    except RuntimeError as exc:
        raise UsageError(f"{model_name} cannot take input {input_shape}: {str(exc).splitlines()[0]}") from exc

    manifest = new_manifest()
    classes = [f"class_{i}" for i in range(classes_n)]
    if data_dir is not None:
        classes = _write_data_config(
            out, model_name, weights, Path(data_dir), input_shape, mean, std, classes_n
        )
    else:
        # A config.yaml left by an earlier export with --data would point the checks at stale images.
        run_layout.run_path(out, run_layout.CONFIG).unlink(missing_ok=True)
    with atomic_output(out / STUDENT_FILE) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    manifest["classes"] = classes
    manifest["input"] = {
        "shape": list(input_shape),
        "layout": "NCHW",
        "dtype": "float32",
        "mean": list(mean),
        "std": list(std),
        "resize": None,
    }
    manifest["student"] = {
        "arch": model_name,
        "num_classes": classes_n,
        "sha256": sha256_file(out / STUDENT_FILE),
        "source_weights": str(Path(weights).resolve()),
        "source_weights_sha256": sha256_file(weights),
    }
    manifest["data"] = {"dataset": "imagefolder", "root": str(Path(data_dir).resolve())} if data_dir else {}
    record_artifact(out, manifest, STUDENT_FILE, "weights")
    write_manifest(out, manifest)


# What a run trained by `reviewkd distill` or `reviewkd teacher` holds and `export --model` never writes.
_TRAINING_RUN_FILES = (
    run_layout.CHECKPOINT,
    run_layout.METRICS,
    run_layout.TEACHER_WEIGHTS,
    run_layout.QAD_DIR,
)


def _check_model_out(out: Path) -> None:
    """Refuse an --out that holds a run `export --model` did not make, before anything is written.

    export --model rewrites manifest.json and student.safetensors in --out; over a distilled run that
    would destroy the trained student and its record (distill and teacher refuse the same). A folder
    an earlier `export --model` wrote (its manifest records the student's source_weights) is
    exported again.
    """
    found = [name for name in _TRAINING_RUN_FILES if run_layout.run_path(out, name).exists()]
    manifest_file = run_layout.run_path(out, run_layout.MANIFEST)
    if not found and manifest_file.exists():
        try:
            student = read_manifest(out).get("student") or {}
        except UsageError:
            student = {}
        if "source_weights" not in student:
            found = [run_layout.MANIFEST]
    if found:
        raise UsageError(
            f"--out {out}: already holds a run that export --model did not write ({found[0]}); it would"
            f" overwrite its manifest and student: choose another --out (`reviewkd export {out}` exports"
            " that run itself)"
        )


def _write_data_config(
    out: Path,
    model_name: str,
    weights: str | os.PathLike[str],
    data_dir: Path,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
) -> list[str]:
    """Write out/config.yaml pointing reviewkd.data at the ImageFolder tree; return its class names."""
    channels, height, width = input_shape
    if channels != 3 or height != width:
        raise UsageError(f"--data: ImageFolder images load as 3 x S x S; --input-shape {input_shape} is not")
    train = data_dir / "train"
    if not train.is_dir():
        raise UsageError(f"--data {data_dir}: expected an ImageFolder tree with train/ and val/ or test/")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if len(classes) != num_classes:
        raise UsageError(
            f"--data {data_dir}: {len(classes)} class folders, the model has {num_classes} classes"
        )
    config = Config(
        data=DataConfig(
            dataset="imagefolder",
            root=str(data_dir.resolve()),
            image_size=height,
            mean=list(mean),
            std=list(std),
        ),
        student=ModelConfig(arch=model_name, weights=str(Path(weights).resolve())),
    )
    save_config(validate(config), run_layout.run_path(out, run_layout.CONFIG))
    return classes
