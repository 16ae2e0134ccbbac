"""The producer interface: how export makes each format's file, one registered producer per format.

deploy.formats owns the formats (their names, files and precisions); export owns how each is made.
A task's way of exporting is an `ExportTask`, one per name of deploy.tasks.TASKS in
export.pipeline.EXPORT_TASKS:

- `load_model(run, manifest)` returns the task's deployable wrapper of the run's trained model (for
  classification the bare student, whose output is the logits);
- `reference(model, images, device)` computes the wrapper's outputs on a list of float32 NCHW
  batches on `device` ("cpu" or "cuda", in full fp32), the reference every exported file is checked
  against;
- `producers` maps a format name of deploy.formats to its `FormatProducer`; the formats the task
  exports are these (by default every one but the opt-in uint8-input file, and TensorRT only
  where it can build); any other --formats is refused for the task;
- `check_images(request)` reads the images every file is checked on and computes the wrapper's
  reference outputs on them (`CheckImages`, with a line saying what they are); None: the run's
  validation split through its `BatchSource`, with labels, or random inputs without data
  (classification's). A task whose files are judged against truth richer than labels (detection's
  boxes) keeps it in `CheckImages.ground_truth`, in its own form;
- `engine_sources` maps each TensorRT engine precision to the run-relative ONNX file it is built
  from (a detector's fp32 engine comes from its EfficientNMS file);
- `calib_samples` and `batch_size` are the task's defaults for export_run's options of those names;
- `layerwise(run, manifest, count)` says what `reviewkd layerwise` (export.layerwise) compares the
  run's files on: a `LayerwiseSetup` of up to `count` of the run's images, the tensors where the
  comparison stops (the classifier's logits, the detector's head outputs: its post-processing is
  never compared) and, where the task has one, its own metric of both files as deployed (a
  detector's mAP on those images).

`ExportOptions` holds each task's int8 budget in its gate's metric (`max_top1_drop_int8` for
classifiers, `max_map_drop_int8` for detectors) and `held_out_samples`, the training images int8
is judged on (None: the task's default).

export_run reads the manifest's task, loads the wrapper, computes the reference outputs on the check
images once, and loops over its producers in their table's order (the registry's), running those
of the requested formats and the ones they are made from. Each `FormatProducer` says:

- `made_from`: the format whose checked file it starts from ("onnx" for every ONNX flavour but
  fp32), produced first; when that file failed its check, the format is skipped with that reason;
- `unavailable(context)`: why it cannot run at all in this export (no images for int8), or None;
  asked before `made_from` is looked at, so that reason wins;
- `produce(context, name)`: make, check and record the file(s) of format `name` through
  `context.recorder` (ExportRecorder.checked keeps a passing file and renames a failing one), timing
  each stage on `context.timer`; it returns whether its file passed, which formats made from it read.

A producer reads everything it needs from the `ExportContext`: the run, its manifest, the wrapper,
the options, the check images with their reference outputs, and `context.once(key, compute)` for
work several producers share (the int8 flavours' calibration images), computed by the first.
A task other than classification supplies its own wrapper, reference, check images and producers
in a module of export/ that imports this one (detection: export.detection_producing), and adds its
ExportTask to export.pipeline.EXPORT_TASKS.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from deploy import run_layout
from deploy.errors import GateFailedError, MissingDependencyError, UsageError
from deploy.formats import ONNX_FORMATS, TENSORRT_SOURCES
from deploy.manifest import (
    ArtifactEntry,
    ExportTiming,
    Manifest,
    forget_artifact,
    model_block,
    record_artifact,
    write_manifest,
)
from deploy.predict import STUDENT_SHA256_KEY
from export.check import CPU_CHECKS, CheckDevice, CheckResult
from export.timing import StageTimer, timing_table

if TYPE_CHECKING:
    import torch

# (split, batch_size, limit) -> batches of (float32 NCHW images, int64 labels)
BatchSource = Callable[[str, int, int], Iterable[tuple[np.ndarray, np.ndarray]]]

# mAP points a detector's int8 files may lose against fp32 on the held-out images before parts of
# the head stay in float (export.detection_pipeline's mixed precision).
DEFAULT_MAX_MAP_DROP_INT8 = 1.0
# The ONNX file each engine precision is built from, for a task whose ONNX files are the registry's.
STANDARD_ENGINE_SOURCES: dict[str, str] = {p: ONNX_FORMATS[f].file for p, f in TENSORRT_SOURCES.items()}

# TensorRT's builder optimisation levels run from 0 to 5.
MAX_TRT_OPT_LEVEL = 5

T = TypeVar("T")


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
        """Record `rel` as a kept file of `kind` with `meta`, and write the manifest."""
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
        """Record that format `fmt` was not made, and why."""
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


@dataclass(frozen=True)
class ExportOptions:
    """The settings of one export that producers read (export_run's arguments, checked there)."""

    calib_samples: int = 512
    calib_method: str = "auto"
    max_top1_drop_int8: float | None = 0.3
    batch_size: int = 64
    opset: int | None = None  # None: export.onnx_export.DEFAULT_OPSET
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    check_samples: int = 10_000
    max_map_drop_int8: float | None = DEFAULT_MAX_MAP_DROP_INT8
    held_out_samples: int | None = None  # None: the task's default
    check_device: str = "auto"  # export.check.CHECK_DEVICES; resolved once into ExportContext.device


@dataclass(frozen=True)
class CheckImages:
    """The images every file of one export is checked on, with the wrapper's reference outputs."""

    batches: list[np.ndarray]  # float32 NCHW
    # the wrapper's outputs on `batches` in the task's form (classification: the logits, concatenated)
    reference: Any
    labels: np.ndarray | None  # None: random inputs, or a task whose truth is not labels
    ground_truth: Any = None  # the truth beyond labels, in the task's form (detection: its boxes)


@dataclass(frozen=True)
class CheckRequest:
    """What a task's `check_images` reads: the run, its wrapper, its images (None: no data) and the
    export's options (check_samples, batch_size), with the timer its stages are timed on and the
    device its reference and checks compute on."""

    run: Path
    manifest: Manifest
    model: torch.nn.Module
    source: BatchSource | None
    options: ExportOptions
    timer: StageTimer
    device: CheckDevice = CPU_CHECKS


@dataclass
class ExportContext:
    """What a producer reads and writes through: one per export_run (see the module docstring).

    `device` says where the references and the files' checks, scores and searches compute
    (export.check.CheckDevice: pass `device.torch` to the task's reference and `device.onnxruntime`
    to every export.check session); `source` gives the run's images by split (None where the run has
    none: `has_data` is False);
    `data_seed` is the seed of the training-image shuffle where known; `tensorrt_missing` is why
    TensorRT cannot build engines here (None: it can); `engine_sources` is the task's; `passed`
    maps each format produced so far to whether its file passed its check. `resources` holds what
    producers open for the rest of the export (the int8 flavours' shared calibration statistics):
    export_run closes it at the end.
    """

    run: Path
    manifest: Manifest
    model: torch.nn.Module
    recorder: ExportRecorder
    timer: StageTimer
    log: Callable[[str], None]
    options: ExportOptions
    checks: CheckImages
    source: BatchSource
    has_data: bool
    data_seed: int | None
    tensorrt_missing: str | None
    device: CheckDevice = CPU_CHECKS
    engine_sources: Mapping[str, str] = field(default_factory=lambda: dict(STANDARD_ENGINE_SOURCES))
    passed: dict[str, bool] = field(default_factory=dict)
    resources: contextlib.ExitStack[None] = field(default_factory=contextlib.ExitStack)
    _shared: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, compute: Callable[[], T]) -> T:
        """`compute()` the first time `key` is asked for in this export; its result every time."""
        if key not in self._shared:
            self._shared[key] = compute()
        result: T = self._shared[key]
        return result


class ProduceFormat(Protocol):
    """Make, check and record format `name`'s file(s); return whether its file passed."""

    def __call__(self, context: ExportContext, name: str) -> bool: ...


def always_available(_context: ExportContext) -> str | None:
    """The `unavailable` of a producer that can run in every export."""
    return None


@dataclass(frozen=True)
class FormatProducer:
    """How one format's file is made (module docstring)."""

    produce: ProduceFormat
    made_from: str | None = None
    unavailable: Callable[[ExportContext], str | None] = always_available


@dataclass(frozen=True)
class EndMetric:
    """A task's own metric of the fp32 file and a lower-precision one, both run as deployed on the
    same images (a detector's mAP): what the layer-wise errors cost in the end."""

    label: str  # as deploy.tasks.TaskSpec.metric_label spells it ("mAP@[.5:.95] %")
    reference: float  # the fp32 file's
    candidate: float
    higher_is_better: bool = True

    @property
    def drop(self) -> float:
        """How much worse the candidate is, in the metric's units (negative: better)."""
        gain = self.candidate - self.reference
        return -gain if self.higher_is_better else gain

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form, the drop included."""
        return {**self.__dict__, "drop": self.drop}


@dataclass(frozen=True)
class LayerwiseSetup:
    """What export.layerwise compares a run's fp32 file and a lower-precision one on: `images`
    (float32 NCHW, as the files take them; `source` says which), the tensors both files share where
    the comparison ends (`end_outputs`, named `end_label`: only the nodes they depend on are
    compared), and `end_metric(fp32 file, candidate file)`, the task's metric of both as deployed,
    or None for a task whose end outputs say it all (a classifier's logits)."""

    images: np.ndarray
    source: str
    end_outputs: tuple[str, ...]
    end_label: str  # what the end outputs are, for people ("logits", "head outputs")
    end_metric: Callable[[Path, Path], EndMetric] | None = None


@dataclass(frozen=True)
class ExportTask:
    """How a task's runs are exported (module docstring): its wrapper, its reference, its producers,
    in the order they run."""

    load_model: Callable[[Path, Manifest], torch.nn.Module]
    reference: Callable[[torch.nn.Module, Sequence[np.ndarray], str], Any]
    producers: Mapping[str, FormatProducer]
    check_images: Callable[[CheckRequest], tuple[CheckImages, str]] | None = None
    engine_sources: Mapping[str, str] = field(default_factory=lambda: dict(STANDARD_ENGINE_SOURCES))
    calib_samples: int = 512
    batch_size: int = 64
    layerwise: Callable[[Path, Manifest, int], LayerwiseSetup] = field(kw_only=True)

    def plan(self, requested: Sequence[str]) -> list[str]:
        """The formats to run for `requested`: those and every format they are made from, in the
        producers' order."""
        needed = set(requested)
        for name in reversed(list(self.producers)):
            made_from = self.producers[name].made_from
            if name in needed and made_from is not None:
                needed.add(made_from)
        return [name for name in self.producers if name in needed]
