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

`--formats tensorrt` alone builds engines from the run's already checked ONNX files and needs
neither torch nor the student: that is the path of a serving device (a Jetson) with the edge
install. Every other format loads the student with torch, which this module imports only then.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploy import run_layout
from deploy.errors import GateFailedError, MissingDependencyError, UsageError
from deploy.fileio import atomic_output, ensure_writable_dir, sha256_file
from deploy.formats import (
    ALL_EXPORT_FORMATS,
    ONNX_FORMATS,
    TENSORRT_FORMAT,
    TENSORRT_SOURCES,
    UINT8_INPUT,
)
from deploy.gpu import probe_gpu
from deploy.manifest import (
    MAX_IMAGE_SIDE,
    ArtifactEntry,
    ExportTiming,
    Manifest,
    forget_artifact,
    input_spec,
    model_block,
    new_manifest,
    read_manifest,
    record_artifact,
    verify_artifact,
    write_manifest,
)
from deploy.optional import optional_import, require_installed
from deploy.predict import STUDENT_SHA256_KEY
from deploy.run_lock import locks_run
from deploy.trt_sidecar import sidecar_path, tensorrt_available
from export.check import UINT8_INPUT as UINT8_CHECK
from export.check import CheckResult, check_file, run_onnx
from export.tensorrt_engine import build_engine
from export.timing import StageTimer, timing_table
from reviewkd.config import Config, DataConfig, ModelConfig, save_config, validate

if TYPE_CHECKING:
    import torch

STUDENT_FILE = run_layout.STUDENT_WEIGHTS
FP32_FILE = ONNX_FORMATS["onnx"].file
RANDOM_CHECK_IMAGES = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (split, batch_size, limit) -> batches of (float32 NCHW images, int64 labels)
BatchSource = Callable[[str, int, int], Iterable[tuple[np.ndarray, np.ndarray]]]


# TensorRT's builder optimisation levels run from 0 to 5.
MAX_TRT_OPT_LEVEL = 5


@dataclass(frozen=True)
class TensorRTOptions:
    """Engine-building settings passed to export.tensorrt_engine.build_engine."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = 1024
    optimization_level: int = 3
    compatibility: str | None = None
    dla_core: int | None = None  # build for this DLA core of a Jetson; None: the GPU
    gpu_fallback: bool = True  # with dla_core: layers the DLA cannot run go to the GPU

    def __post_init__(self) -> None:
        """Check the values when they are given, before TensorRT is looked for: a wrong profile is
        bad input (exit 2) on any machine, not a missing TensorRT (exit 3)."""
        profile = (self.min_batch, self.opt_batch, self.max_batch)
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(
                f"--trt-batch {','.join(map(str, profile))}: expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX"
            )
        if self.workspace_mib < 1:
            raise UsageError(f"--trt-workspace-mib must be >= 1, got {self.workspace_mib}")
        if not 0 <= self.optimization_level <= MAX_TRT_OPT_LEVEL:
            raise UsageError(
                f"--trt-opt-level must be 0 to {MAX_TRT_OPT_LEVEL}, got {self.optimization_level}"
            )
        if self.dla_core is not None and self.dla_core < 0:
            raise UsageError(f"--dla-core must be a DLA core number >= 0, got {self.dla_core}")


@dataclass
class ExportSummary:
    """What one export did: the files kept, the checks, what failed and what was skipped."""

    run_dir: Path
    files: dict[str, ArtifactEntry] = field(default_factory=dict)  # relpath -> manifest entry
    checks: dict[str, CheckResult] = field(default_factory=dict)  # relpath -> its check
    failed: dict[str, str] = field(default_factory=dict)  # relpath (before .failed) -> reason
    skipped: dict[str, str] = field(default_factory=dict)  # format -> reason
    missing_dependency: str | None = None  # set when TensorRT was asked for and is not here
    check_data: str = ""  # what the checks ran on
    timing: ExportTiming | None = None  # where the time went; also manifest["export"]["timing"]

    def raise_for_status(self) -> None:
        """Raise GateFailedError if a file failed its gate, else MissingDependencyError if TensorRT was
        asked for and is missing; return quietly otherwise."""
        if self.failed:
            listed = "; ".join(f"{rel}: {why}" for rel, why in self.failed.items())
            raise GateFailedError(f"{len(self.failed)} exported file(s) failed their check ({listed})")
        if self.missing_dependency:
            raise MissingDependencyError(self.missing_dependency)


def parse_formats(text: str | Sequence[str] | None) -> list[str] | None:
    """Turn "onnx,fp16" (or a list) into known format names; None means the default set."""
    if text is None:
        return None
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in ALL_EXPORT_FORMATS]
    if unknown or not names:
        raise UsageError(
            f"--formats {','.join(names)}: expected a comma-separated subset of"
            f" {','.join(ALL_EXPORT_FORMATS)}"
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
    def source(split: str, batch_size: int, limit: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        with optional_import("exporting ONNX files"):
            from reviewkd.data import iter_run_batches

        return iter_run_batches(run, split, batch_size, limit)

    return source


def torch_logits(model: torch.nn.Module, batches: Sequence[np.ndarray]) -> np.ndarray:
    with optional_import("exporting ONNX files"):
        import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(b)).float().numpy() for b in batches])


class ExportRecorder:
    """Keeps the manifest and the summary in step; the manifest is rewritten after every file."""

    def __init__(self, run: Path, manifest: Manifest, summary: ExportSummary) -> None:
        self.run, self.manifest, self.summary = run, manifest, summary
        self.block: dict[str, Any] = manifest.setdefault("export", {})
        self.block.setdefault("checks", {})
        self.block.setdefault("failed", {})
        # sha256 of the student.safetensors the files are made from (the loaders check the file
        # against it): recorded with each file, so that deploy can tell an export from an older
        # student after retraining (STUDENT_SHA256_KEY).
        self.student_sha256 = model_block(manifest, "student").sha256

    def keep(self, rel: str, kind: str, **meta: Any) -> None:
        self.block["failed"].pop(rel, None)
        if self.student_sha256 is not None:
            meta.setdefault(STUDENT_SHA256_KEY, self.student_sha256)
        self.summary.files[rel] = record_artifact(self.run, self.manifest, rel, kind, **meta)
        write_manifest(self.run, self.manifest)

    def checked(self, rel: str, result: CheckResult, kind: str, **meta: Any) -> bool:
        """Record a checked file: kept if it passed, renamed to .failed if not. Returns passed."""
        self.summary.checks[rel] = result
        self.block["checks"][rel] = result.as_dict()
        if result.passed:
            self.keep(rel, kind, check=result.status, **meta)
            return True
        path = self.run / rel
        os.replace(path, path.with_name(path.name + run_layout.FAILED_SUFFIX))
        forget_artifact(self.manifest, rel)
        self.block["failed"][rel] = result.reason
        self.summary.failed[rel] = result.reason
        write_manifest(self.run, self.manifest)
        return False

    def skip(self, fmt: str, reason: str) -> None:
        self.summary.skipped[fmt] = reason
        self.block.setdefault("skipped", {})[fmt] = reason
        write_manifest(self.run, self.manifest)

    def finish(self, timer: StageTimer, log: Callable[[str], None]) -> None:
        """Record the timing table in the summary and the manifest, write the manifest, print the table."""
        timing = timer.block()
        self.summary.timing = timing
        self.block["timing"] = timing
        write_manifest(self.run, self.manifest)
        log("time per stage (wall: elapsed; cpu: this process, every thread):\n" + timing_table(timing))


@locks_run("export")
def export_run(
    run_dir: str | os.PathLike[str],
    formats: Sequence[str] | None = None,
    *,
    calib_samples: int = 512,
    calib_method: str = "auto",
    max_top1_drop_int8: float | None = 0.3,
    bake_preprocessing: bool = False,
    check_samples: int = 10_000,
    batch_size: int = 64,
    opset: int | None = None,
    tensorrt: TensorRTOptions | None = None,
    batches: BatchSource | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    timer: StageTimer | None = None,
) -> ExportSummary:
    """Export the run's student to `formats` (default: every ONNX flavour, plus TensorRT if here).

    Args:
        run_dir: a run directory with manifest.json and student.safetensors.
        formats: names from ALL_FORMATS; None is every ONNX format, plus "tensorrt" where TensorRT
            and a GPU are available. Any ONNX flavour also writes the fp32 file it is made from.
        calib_samples, calib_method: int8 calibration on this many training images, with this
            method of export.calibration.METHOD_CHOICES ("auto": the best, judged on the next
            DEFAULT_HELD_OUT training images).
        max_top1_drop_int8: points of top-1 the int8 files may lose against fp32 on those held-out
            images before their most sensitive layers stay in float (export.mixed_precision);
            None quantizes every layer.
        bake_preprocessing: also write export/student.uint8.onnx (uint8 NHWC input).
        check_samples: validation images the checks run on (default 10,000: all of a CIFAR test set;
            the int8 gate judges the paired interval of the drop, which needs images).
        opset: the ONNX opset (None: export.onnx_export.DEFAULT_OPSET).
        batches: the image source; None reads the run's data with reviewkd.data.iter_run_batches,
            or, for a run without config.yaml (a --model export without --data), checks on random
            inputs and skips int8.
        log: receives one line per step, and at the end the timing table (export.timing).
        timer: a timer already running (export_model's, which timed laying out the folder); None
            starts one here. Its table goes to the summary's `timing` and manifest["export"]["timing"].

    Returns the summary; call its raise_for_status() to turn failures into exit codes.

    Raises:
        UsageError: no student, a bad manifest, an unwritable export folder, a bad option.
        MissingDependencyError: an ONNX format was asked for and torch is not installed.
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
        from export.calibration import METHOD_CHOICES
        from export.onnx_export import check_opset

    if opset is not None:
        check_opset(opset)
    if calib_method not in METHOD_CHOICES:
        raise UsageError(f"--calib-method {calib_method!r}: expected one of {', '.join(METHOD_CHOICES)}")
    for name, value in (
        ("--calib-samples", calib_samples),
        ("check_samples", check_samples),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    manifest = read_manifest(run)
    spec = input_spec(manifest)
    input_shape = spec.shape
    model = load_student(run, manifest)
    ensure_writable_dir(run / run_layout.EXPORT_DIR)
    summary = ExportSummary(run)
    recorder = ExportRecorder(run, manifest, summary)

    trt_ok, trt_reason = tensorrt_status() if wanted is None or "tensorrt" in wanted else (False, "")
    if wanted is None:
        wanted = list(ONNX_FORMATS) + (["tensorrt"] if trt_ok else [])
        if not trt_ok:
            recorder.skip("tensorrt", f"not requested by default: {trt_reason}")

    has_data = batches is not None or run_layout.run_path(run, run_layout.CONFIG).is_file()
    source = batches if batches is not None else run_batches(run)
    mean, std = spec.mean, spec.std

    # Check images and the student's reference logits, computed once for every file.
    if has_data:
        with timer.shared("read check images"):
            pairs = list(source("val", batch_size, check_samples))
        if not pairs:
            raise UsageError(f"{run}: the validation split has no images to check the exported files on")
        val_images = [p[0].astype(np.float32) for p in pairs]
        val_labels = np.concatenate([p[1] for p in pairs])
        labels: np.ndarray | None = val_labels
        summary.check_data = (
            f"{len(val_labels)} validation images of the run (a sequential check, int8's, stops once its"
            " interval resolves the budget and says how many it used)"
        )
    else:
        rng = np.random.default_rng(0)
        count = min(check_samples, RANDOM_CHECK_IMAGES)
        val_images = [rng.standard_normal((count, *input_shape), dtype=np.float32)]
        labels = None
        summary.check_data = f"{count} random inputs (no image data: int8 skipped, accuracy not measured)"
    with timer.shared("reference logits (PyTorch)"):
        reference = torch_logits(model, val_images)
    recorder.block.update(
        {"check_data": summary.check_data, "opset": opset, "formats": wanted, "calibration": None}
    )

    recorded = model_block(manifest, "student")
    metadata = {
        "classes": manifest.get("classes", []),
        "input": manifest.get("input", {}),
        "student": {"arch": recorded.arch, "num_classes": recorded.num_classes, "sha256": recorded.sha256},
        "source_sha256": sha256_file(run / STUDENT_FILE),
    }
    with optional_import("exporting ONNX files"):
        from export.calibration import AUTO, DEFAULT_HELD_OUT, quantize_calibrated, split_training_images
        from export.mixed_precision import BUDGET_HELD_OUT
        from export.onnx_export import DEFAULT_OPSET, export_fp32
        from export.precision import convert_fp16

    opset = DEFAULT_OPSET if opset is None else opset
    onnx_wanted = [f for f in ONNX_FORMATS if f in wanted]
    fp32_ok = False
    if onnx_wanted or bake_preprocessing:
        log(f"exporting {FP32_FILE}")
        with timer.stage(FP32_FILE, "export"):
            info = export_fp32(model, run / FP32_FILE, input_shape, metadata, opset=opset)
        recorder.block["weights"] = {
            k: v for k, v in info.items() if k not in ("opset", "exporter", "optimizer")
        }
        with timer.stage(FP32_FILE, "check"):
            result = check_file(run / FP32_FILE, "fp32", val_images, reference, labels)
        fp32_ok = recorder.checked(FP32_FILE, result, "onnx", precision="fp32", flavour="fp32", **info)
        log(f"  {FP32_FILE}: {result.status} ({result.reason})")

    def from_fp32(fmt: str) -> bool:
        if not fp32_ok:
            recorder.skip(fmt, f"{FP32_FILE} failed its check")
        return fp32_ok

    fp32_path = run / FP32_FILE
    if "fp16" in wanted and from_fp32("fp16"):
        rel = ONNX_FORMATS["fp16"].file
        log(f"converting {rel}")
        with timer.stage(rel, "convert"):
            info = convert_fp16(fp32_path, run / rel)
        with timer.stage(rel, "check"):
            result = check_file(run / rel, "fp16", val_images, reference, labels)
        recorder.checked(rel, result, "onnx", precision="fp16", flavour="fp16", **info)
        log(f"  {rel}: {result.status} ({result.reason})")

    int8_wanted = [f for f in ("int8", "int8-trt") if f in wanted]
    if int8_wanted and not has_data:
        for fmt in int8_wanted:
            recorder.skip(fmt, "int8 needs calibration and validation images: pass --data IMAGEFOLDER")
    elif int8_wanted and fp32_ok:
        with optional_import("exporting ONNX files"):
            from reviewkd.data import DATA_SEED

        budget = max_top1_drop_int8
        # The budget is confirmed on an interval: that may take many held-out images (mixed_precision).
        held_out = BUDGET_HELD_OUT if budget is not None else DEFAULT_HELD_OUT if calib_method == AUTO else 0
        log(f"calibrating int8 on up to {calib_samples} training images ({calib_method})")
        with timer.shared("read calibration images"):
            data = split_training_images(
                source("train", batch_size, calib_samples + held_out),
                calib_samples,
                held_out,
                seed=DATA_SEED if batches is None else None,
            )
        # The fp32 file's logits on the held-out images: one pass that every int8 flavour's
        # calibration candidates and mixed-precision search compare against.
        held_out_reference = None
        if data.held_out:
            with timer.shared("held-out reference logits (fp32 ONNX)"):
                held_out_reference = run_onnx(fp32_path, data.held_out)
        recorder.block["calibration"] = {"method": calib_method, **data.describe()}
        for fmt in int8_wanted:
            rel = ONNX_FORMATS[fmt].file
            log(f"quantizing {rel}")
            desc = quantize_calibrated(
                fp32_path,
                run / rel,
                data,
                flavour=ONNX_FORMATS[fmt].flavour,
                method=calib_method,
                max_top1_drop=budget,
                held_out_reference=held_out_reference,
                clock=timer.clock(rel),
            )
            floats = [layer["module"] for layer in desc.get("mixed_precision", {}).get("float_layers", [])]
            method = desc["calibration"]["method"]
            log(f"  calibration: {method}; float layers: {', '.join(floats) or 'none'}")
            with timer.stage(rel, "check"):
                result = check_file(run / rel, "int8", val_images, reference, labels)
            recorder.checked(rel, result, "onnx", precision="int8", **desc)
            log(f"  {rel}: {result.status} ({result.reason})")
    else:
        for fmt in int8_wanted:
            from_fp32(fmt)

    if bake_preprocessing and from_fp32(UINT8_INPUT.name):
        with optional_import("exporting ONNX files"):
            from export.preprocessing import bake_preprocessing as bake_uint8_input
            from export.preprocessing import to_uint8_nhwc

        uint8_rel = UINT8_INPUT.file
        log(f"baking preprocessing into {uint8_rel}")
        with timer.stage(uint8_rel, "bake"):
            info = bake_uint8_input(fp32_path, run / uint8_rel, mean, std)
        # Its own images (the check images rounded to uint8), so its own reference pass.
        with timer.stage(uint8_rel, "reference logits (PyTorch)"):
            pairs_u8 = [to_uint8_nhwc(b, mean, std) for b in val_images]
            ref_u8 = torch_logits(model, [p[1] for p in pairs_u8])
        with timer.stage(uint8_rel, "check"):
            result = check_file(run / uint8_rel, UINT8_CHECK, [p[0] for p in pairs_u8], ref_u8, labels)
        recorder.checked(
            uint8_rel, result, "onnx", precision=UINT8_INPUT.precision, flavour=UINT8_INPUT.flavour, **info
        )
        log(f"  {uint8_rel}: {result.status} ({result.reason})")

    if TENSORRT_FORMAT in wanted:
        if not trt_ok:
            summary.missing_dependency = f"--formats tensorrt: {trt_reason}"
            recorder.skip("tensorrt", trt_reason)
        else:
            _build_engines(run, manifest, recorder, tensorrt or TensorRTOptions(), log, timer)
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
        ensure_writable_dir(run / run_layout.EXPORT_DIR)
        _build_engines(run, manifest, recorder, tensorrt or TensorRTOptions(), log, timer)
    recorder.finish(timer, log)
    return summary


def _build_engines(
    run: Path,
    manifest: Manifest,
    recorder: ExportRecorder,
    options: TensorRTOptions,
    log: Callable[[str], None],
    timer: StageTimer,
) -> None:
    """Build one engine per precision from the ONNX files that passed (this export or an earlier one)."""
    for precision, fmt in TENSORRT_SOURCES.items():
        rel = ONNX_FORMATS[fmt].file
        if options.dla_core is not None and precision == "fp32":
            recorder.skip(f"tensorrt/{precision}", "the DLA computes in fp16 and int8 only")
            continue
        try:
            source = verify_artifact(run, manifest, rel)
        except UsageError as exc:
            recorder.skip(f"tensorrt/{precision}", f"no checked {rel} to build from ({exc})")
            continue
        plan_rel = run_layout.engine_file(precision)
        log(f"building {plan_rel} from {rel}")
        with timer.stage(plan_rel, "tensorrt build"):
            sidecar = build_engine(
                source,
                run / plan_rel,
                min_batch=options.min_batch,
                opt_batch=options.opt_batch,
                max_batch=options.max_batch,
                workspace_mib=options.workspace_mib,
                timing_cache=run / run_layout.TIMING_CACHE,
                optimization_level=options.optimization_level,
                compatibility=options.compatibility,
                precision=precision,
                dla_core=options.dla_core,
                gpu_fallback=options.gpu_fallback,
            )
        recorder.keep(
            plan_rel,
            "tensorrt",
            precision=precision,
            source=rel,
            tensorrt_version=sidecar.get("tensorrt_version"),
            # An engine is as current as the ONNX file it was built from, maybe from an earlier export.
            **{STUDENT_SHA256_KEY: manifest["artifacts"][rel].get(STUDENT_SHA256_KEY)},
        )
        side_rel = sidecar_path(run / plan_rel).relative_to(run).as_posix()
        recorder.keep(side_rel, "sidecar", precision=precision, plan=plan_rel)


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
