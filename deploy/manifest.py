"""manifest.json: the record that travels from distillation to export to deployment.

Layout (docs/METHOD.md section 5.1); every stage adds to it and rewrites it atomically:

    schema_version   int, MANIFEST_SCHEMA_VERSION
    task             "classification" | "detection" (deploy.tasks; absent in older runs: classification)
    classes          list of class names, index = label
    input            {"shape": [C, H, W], "layout": "NCHW", "dtype": "float32",
                      "mean": [..], "std": [..] (on 0-1 pixel values), "resize": int or null
                      (shorter side before the centre crop to H x W; null: resize to H x W)}
    student          {"arch", "num_classes", "sha256" (of student.safetensors), "top1", "top5"}
    teacher          {"arch", "sha256" (of its weights file, or null), "top1", "top5"}
    method           {"name": "ce" | "kd" | "reviewkd" | "reviewkd+kd", "params": {...}}
    data             {"dataset": ..., ...}: where the validation images come from
    artifacts        {relative path: {"sha256", "size_bytes", "kind", ...}} where kind is one of
                     "weights", "onnx", "tensorrt", "sidecar", "report", "checkpoint"; ONNX and
                     TensorRT entries also carry "precision" ("fp32", "fp16", "int8", ...)
    detection        a detector's post-processing, as its exported files embed it: {"max_detections"
                     (K, rows per image), "score_threshold", "iou_threshold"} (DetectionSettings)
    export           the latest export: its checks, failures, calibration, "timing"
                     (ExportTiming: wall and CPU seconds of each stage per file) and
                     "check_device" (CheckDeviceRecord: where its references and checks computed)

`read_manifest` checks this shape once, where the file is read, so no reader meets a KeyError
later; `input_spec` is the one parser of the input block. The checks hold the manifest to what
the stages that use it can serve: image sides and the resize bounded (MAX_IMAGE_SIDE), finite
mean and std, class names that are unique, printable (a name is printed to a terminal and written
as a line of a labels file) and as many as the student's classes. A model file's embedded
manifest gets the same checks (`check_embedded_manifest`), and a file opened from a run must agree
with the run's manifest (`check_manifests_agree`): the run manifest is the root of trust.
Artifact paths are confined to the run: a key must be relative without "..", and the file it names,
symlinks resolved, must lie inside the resolved run directory. Both are checked before any file is
opened or hashed.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Required, TypedDict, cast

from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import check_self_contained_onnx, parse_json, sha256_file, write_json_atomic
from deploy.tasks import TASKS

MANIFEST_NAME = run_layout.MANIFEST
MANIFEST_SCHEMA_VERSION = 1

# Image channel counts the preprocessing can read images as (grey, RGB).
IMAGE_CHANNELS = (1, 3)
# The largest image side (input H or W, and the resize) a manifest may ask for. Classifiers take a
# few hundred pixels a side (ImageNet's 224, 518 for large ViTs); 4096 leaves room, and keeps one
# preprocessed image under 210 MB, where a resize of 100000 would make predict resize every image
# to 10^10 pixels.
MAX_IMAGE_SIDE = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactEntry(TypedDict, total=False):
    """One file of the run as the manifest records it; more keys (flavour, source, ...) may follow."""

    sha256: Required[str]
    size_bytes: Required[int]
    kind: Required[str]
    precision: str


class StageTime(TypedDict):
    """One timed stage of an export, as export.timing.StageTimer records it.

    `file` is the run-relative file the stage worked for, or SHARED_STAGE_FILE for work every file
    uses (the check images and their reference logits); `stage` names what ran ("export", "convert",
    "calibrate minmax", "score minmax", "mixed-precision", "check", ...). `wall_s` is elapsed time
    (time.perf_counter), `cpu_s` the CPU time of the whole process over that span, every thread
    of it (time.process_time: ONNX Runtime's and torch's worker threads included, child processes
    not), so `cpu_s` above `wall_s` means several cores worked.
    """

    file: str
    stage: str
    wall_s: float
    cpu_s: float


class ExportTiming(TypedDict):
    """manifest["export"]["timing"]: where the time of the latest export went.

    `stages` in the order they ran (no two overlap); `total_*` from the start of the export to the
    moment the record was made (its end); `untimed_*` is the total less the stages' sum (loading the student,
    hashing and recording files, writing the manifest), so that the table adds up.
    """

    stages: list[StageTime]
    total_wall_s: float
    total_cpu_s: float
    untimed_wall_s: float
    untimed_cpu_s: float


class CheckDeviceRecord(TypedDict):
    """manifest["export"]["check_device"]: where the latest `reviewkd export` computed its PyTorch
    references ("torch") and ran its ONNX files' checks, scores and searches ("onnxruntime"), each
    "cpu" or "cuda" (the ONNX Runtime CPU int8 flavour always on the CPU), and why `--check-device
    auto` left one of them on the CPU ("notes"). Checks of earlier exports stay in the block beside
    it, so each check records where its own file ran too: export.checks[file]["device"]."""

    torch: str
    onnxruntime: str
    notes: list[str]


class DetectionBlock(TypedDict):
    """manifest["detection"] (and an exported detection file's embedded manifest): the post-processing
    inside the file, read with `detection_settings`."""

    max_detections: int
    score_threshold: float
    iou_threshold: float


# StageTime.file of a stage whose work every file shares.
SHARED_STAGE_FILE = "(shared)"


class Manifest(TypedDict, total=False):
    """The manifest document, the JSON object as stored. The blocks a deployment command reads are
    read through their typed views: input_spec (input), model_block (student, teacher),
    method_block, data_block, deploy.tasks.task_of (task) and ArtifactEntry (artifacts); the export,
    baselines and qad blocks are free-form."""

    schema_version: Required[int]
    task: str
    classes: list[str]
    input: dict[str, Any]
    student: dict[str, Any]
    teacher: dict[str, Any]
    method: dict[str, Any]
    data: dict[str, Any]
    artifacts: Required[dict[str, ArtifactEntry]]
    export: dict[str, Any]
    baselines: dict[str, Any]
    detection: DetectionBlock
    qad: dict[str, Any]  # reviewkd quantize: accuracies, the selected weights, the quantizer placement


# The typed blocks. Each is a frozen dataclass read from its JSON object by `from_dict`, which checks
# the type of every key it knows and raises a one-line UsageError naming the file and the key. A
# dataclass rather than a TypedDict: mypy refuses a misspelt attribute, where a TypedDict's `.get` of
# a misspelt key passes it and returns None at run time. The views are read-only: the Manifest
# document stays the JSON itself, so a stage rewrites it with every key it holds (those of newer
# versions included), and the file on disk does not change by being read.


def _typed(block: Mapping[str, Any], key: str, kinds: tuple[type, ...], expected: str, where: str) -> Any:
    """`block[key]` when absent (None), null or of one of `kinds` (a bool is no number); else the error."""
    value = block.get(key)
    if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
        return value
    raise UsageError(f"{where}.{key}: expected {expected} or null, got {_shown(value)}")


def _object(value: object, where: str) -> Mapping[str, Any]:
    """`value` when it is a JSON object (absent: empty); else the error naming `where`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: expected an object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ModelBlock:
    """manifest["student"] or ["teacher"]: the trained model. `scores` holds the task metrics it
    records (deploy.tasks' model_metrics: top1 and top5, or map and ap50), each a number or null, and
    `test_scores` the same metrics scored once on the test split where the run carved its val split.
    Other keys (an exported zoo model's source weights, ...) stay in the JSON."""

    arch: str | None = None
    num_classes: int | None = None
    weights: str | None = None
    sha256: str | None = None
    epoch: int | None = None
    scores: Mapping[str, float | None] = field(default_factory=dict)
    test_scores: Mapping[str, float | None] | None = None

    @classmethod
    def from_dict(cls, value: object, where: str) -> ModelBlock:
        """Read and check the block found at `where` (e.g. "runs/a/manifest.json: student")."""
        block = _object(value, where)
        num_classes = _typed(block, "num_classes", (int,), "a positive integer", where)
        if num_classes is not None and num_classes < 1:
            raise UsageError(f"{where}.num_classes: expected a positive integer, got {num_classes}")
        test = block.get("test")
        return cls(
            arch=_typed(block, "arch", (str,), "a model name", where),
            num_classes=num_classes,
            weights=_typed(block, "weights", (str,), "a file name", where),
            sha256=_typed(block, "sha256", (str,), "a sha256 digest", where),
            epoch=_typed(block, "epoch", (int,), "an epoch number", where),
            scores=_scores(block, where),
            test_scores=None if test is None else _scores(_object(test, f"{where}.test"), f"{where}.test"),
        )

    @property
    def reported_scores(self) -> Mapping[str, float | None]:
        """The scores a report states: the test split's when the run carved its val split (the
        block's own scores are then that choice's split), else the block's own."""
        return self.scores if self.test_scores is None else self.test_scores


# Every task's model metrics: the keys of a model block that hold scores.
_METRIC_KEYS = tuple(dict.fromkeys(key for spec in TASKS.values() for key, _ in spec.model_metrics))


def _scores(block: Mapping[str, Any], where: str) -> dict[str, float | None]:
    """The metrics a model block (or its "test" entry) records, each a number or null."""
    return {key: _typed(block, key, (int, float), "a number", where) for key in _METRIC_KEYS if key in block}


@dataclass(frozen=True)
class MethodBlock:
    """manifest["method"]: how the student was trained ("ce", "kd", "reviewkd", ...) and its
    hyper-parameters (free-form: each method has its own)."""

    name: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, value: object, where: str) -> MethodBlock:
        """Read and check the block found at `where`."""
        block = _object(value, where)
        return cls(
            name=_typed(block, "name", (str,), "a method name", where),
            params=_object(block.get("params"), f"{where}.params"),
        )


@dataclass(frozen=True)
class DataBlock:
    """manifest["data"]: where the run's images came from (the dataset's name and, for a folder,
    its root); the dataset's other options stay in the JSON for the stages that rebuild it."""

    dataset: str | None = None
    root: str | None = None

    @classmethod
    def from_dict(cls, value: object, where: str) -> DataBlock:
        """Read and check the block found at `where`."""
        block = _object(value, where)
        return cls(
            dataset=_typed(block, "dataset", (str,), "a dataset name", where),
            root=_typed(block, "root", (str,), "a folder", where),
        )


def model_block(manifest: Mapping[str, Any], role: str, source: str = "manifest") -> ModelBlock:
    """The manifest's "student" or "teacher" block (`role`), typed; `source` names the file in errors."""
    return ModelBlock.from_dict(manifest.get(role), f"{source}: {role}")


def method_block(manifest: Mapping[str, Any], source: str = "manifest") -> MethodBlock:
    """The manifest's "method" block, typed."""
    return MethodBlock.from_dict(manifest.get("method"), f"{source}: method")


def data_block(manifest: Mapping[str, Any], source: str = "manifest") -> DataBlock:
    """The manifest's "data" block, typed."""
    return DataBlock.from_dict(manifest.get("data"), f"{source}: data")


@dataclass(frozen=True)
class InputSpec:
    """The manifest's "input" block, checked: (C, H, W), per-channel mean/std on 0-1 values,
    and the shorter side to resize to before the centre crop (None: resize straight to H x W)."""

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> InputSpec:
        """Read and check the "input" block of a manifest; UsageError says what is wrong."""
        block = manifest.get("input") or {}
        if not isinstance(block, Mapping):
            raise UsageError(f"manifest input: expected an object, got {type(block).__name__}")
        shape = block.get("shape")
        if (
            not isinstance(shape, list | tuple)
            or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
            or max(shape[1:]) > MAX_IMAGE_SIDE
        ):
            raise UsageError(
                f"manifest input.shape: expected [C, H, W] positive integers, H and W at most"
                f" {MAX_IMAGE_SIDE}, got {_shown(shape)}"
            )
        channels = shape[0]
        if channels not in IMAGE_CHANNELS:
            raise UsageError(f"manifest input.shape: {channels} channels; images can be read as 1 or 3")
        mean = _channel_values(block, "mean", channels)
        std = _channel_values(block, "std", channels)
        if min(std) <= 0:
            raise UsageError(f"manifest input.std: expected positive numbers, got {list(std)}")
        resize = block.get("resize")
        if resize is not None and (
            not isinstance(resize, int)
            or isinstance(resize, bool)
            or not min(shape[1:]) <= resize <= MAX_IMAGE_SIDE
        ):
            raise UsageError(
                f"manifest input.resize: expected null or an integer from {min(shape[1:])} to"
                f" {MAX_IMAGE_SIDE}, got {_shown(resize)}"
            )
        return cls(shape=(shape[0], shape[1], shape[2]), mean=mean, std=std, resize=resize)


def _channel_values(block: Mapping[str, Any], key: str, channels: int) -> tuple[float, ...]:
    """Return the input block's per-channel numbers under `key`, one per channel."""
    values = block.get(key)
    if (
        not isinstance(values, list | tuple)
        or len(values) != channels
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        or not all(math.isfinite(v) for v in values)
    ):
        raise UsageError(f"manifest input.{key}: expected {channels} finite numbers, got {_shown(values)}")
    return tuple(float(v) for v in values)


def _shown(value: object, limit: int = 80) -> str:
    """`value`'s repr for an error message, cut to `limit` characters: the value came from a file."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


@dataclass(frozen=True)
class DetectionSettings:
    """The checked "detection" block: at most `max_detections` rows per image (K), boxes scoring below
    `score_threshold` dropped, and NMS removing a box that overlaps a better one of its class at IoU
    above `iou_threshold`."""

    max_detections: int
    score_threshold: float
    iou_threshold: float

    def block(self) -> DetectionBlock:
        """The manifest block that records these settings."""
        return {
            "max_detections": self.max_detections,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
        }


def detection_settings(manifest: Mapping[str, Any], source: str = "manifest") -> DetectionSettings:
    """The checked "detection" block of a manifest; UsageError naming `source` and the key otherwise."""
    block = manifest.get("detection")
    if not isinstance(block, Mapping):
        raise UsageError(
            f"{source}: detection: expected an object with max_detections, score_threshold and"
            f" iou_threshold, got {_shown(block)}"
        )
    top_k = block.get("max_detections")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise UsageError(
            f"{source}: detection.max_detections: expected a positive integer, got {_shown(top_k)}"
        )
    thresholds = []
    for key in ("score_threshold", "iou_threshold"):
        value = block.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
            raise UsageError(f"{source}: detection.{key}: expected a number from 0 to 1, got {_shown(value)}")
        thresholds.append(float(value))
    return DetectionSettings(top_k, thresholds[0], thresholds[1])


def input_spec(manifest: Mapping[str, Any]) -> InputSpec:
    """The checked input block of a manifest (the one parser every reader uses)."""
    return InputSpec.from_manifest(manifest)


def new_manifest() -> Manifest:
    """Return an empty manifest of the current schema."""
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "classes": [],
        "input": {},
        "student": {},
        "teacher": {},
        "method": {},
        "data": {},
        "artifacts": {},
    }


def manifest_path(run_dir: str | os.PathLike[str]) -> Path:
    """Return the path of the manifest inside a run directory."""
    return run_layout.run_path(run_dir, MANIFEST_NAME)


def check_artifact_key(key: object, source: str = "artifact") -> str:
    """Return `key` if it is a run-relative POSIX path without "..", else UsageError naming `source`."""
    if not isinstance(key, str) or not key or "\\" in key or "\0" in key:
        raise UsageError(f"{source} {key!r}: expected a relative path inside the run directory")
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts or path.as_posix() != key:
        raise UsageError(
            f"{source} {key!r}: expected a relative path inside the run directory (no leading /, no ..)"
        )
    return key


def _check_entry(where: str, entry: object) -> None:
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected an object with sha256, size_bytes and kind")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise UsageError(f"{where}.sha256: expected 64 lower-case hex digits, got {sha!r}")
    size = entry.get("size_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UsageError(f"{where}.size_bytes: expected a non-negative integer, got {size!r}")
    if not isinstance(entry.get("kind"), str):
        raise UsageError(f"{where}.kind: expected a string, got {entry.get('kind')!r}")
    precision = entry.get("precision")
    if precision is not None and not isinstance(precision, str):
        raise UsageError(f"{where}.precision: expected a string, got {precision!r}")


def check_classes(classes: object, source: str = "manifest") -> list[str]:
    """Return the class names if each is a non-empty printable string and none repeats; UsageError
    naming `source` otherwise. A line break or escape code in a name would forge lines where the
    name is printed or written (predict's table, Triton's labels file); two classes of one name
    cannot be told apart."""
    if not isinstance(classes, list):
        raise UsageError(f"{source}: classes: expected a list of class names, got {type(classes).__name__}")
    seen: set[str] = set()
    for index, name in enumerate(classes):
        if not isinstance(name, str) or not name or not name.isprintable():
            raise UsageError(
                f"{source}: classes[{index}]: {_shown(name)}; a class name must be a non-empty string"
                " without line breaks or control characters"
            )
        if name in seen:
            raise UsageError(f"{source}: classes[{index}]: {_shown(name)} is listed twice")
        seen.add(name)
    return classes


def _check_class_count(data: Mapping[str, Any], source: str) -> None:
    """The class names, where listed, must be as many as the student's classes."""
    classes = data.get("classes") or []
    declared = model_block(data, "student", source).num_classes
    if declared is None:
        return
    if classes and len(classes) != declared:
        raise UsageError(f"{source}: lists {len(classes)} classes but student.num_classes is {declared}")


def check_manifest(data: object, source: str) -> Manifest:
    """Check a manifest document's shape; return it typed, or raise UsageError naming `source` and the key."""
    if not isinstance(data, dict) or "schema_version" not in data:
        raise UsageError(f"{source}: not a reviewkd manifest (no schema_version)")
    version = data["schema_version"]
    if version != MANIFEST_SCHEMA_VERSION:
        raise UsageError(
            f"{source}: manifest schema version {version!r}, this reviewkd reads {MANIFEST_SCHEMA_VERSION}"
        )
    for block in ("input", "student", "teacher", "method", "data", "export", "baselines"):
        if block in data and not isinstance(data[block], dict):
            raise UsageError(f"{source}: {block}: expected an object, got {type(data[block]).__name__}")
    check_classes(data.get("classes", []), source)
    _check_class_count(data, source)
    model_block(data, "teacher", source)
    method_block(data, source)
    data_block(data, source)
    artifacts = data.setdefault("artifacts", {})
    if not isinstance(artifacts, dict):
        kind = type(artifacts).__name__
        raise UsageError(f"{source}: artifacts: expected an object of path -> entry, got a {kind}")
    for key, entry in artifacts.items():
        check_artifact_key(key, f"{source}: artifact")
        _check_entry(f"{source}: artifacts[{key!r}]", entry)
    _check_input(data, source)
    return cast(Manifest, data)


def _check_input(data: Mapping[str, Any], source: str) -> None:
    if data.get("input"):
        try:
            InputSpec.from_manifest(data)
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None


def check_embedded_manifest(data: object, source: str) -> dict[str, Any]:
    """Check the manifest a model file carries in its metadata (export writes its classes, input
    block and student); return it, or UsageError naming `source` (the file).

    The file's content hash is computed by whoever wrote it, so the embedded manifest is checked
    as strictly as a run's: it decides the preprocessing and the class names predict prints.
    """
    if not isinstance(data, dict):
        raise UsageError(f"{source}: its embedded manifest is not a JSON object")
    for block in ("input", "student"):
        if block in data and not isinstance(data[block], dict):
            kind = type(data[block]).__name__
            raise UsageError(f"{source}: embedded {block}: expected an object, got {kind}")
    check_classes(data.get("classes", []), source)
    _check_class_count(data, source)
    _check_input(data, source)
    return data


def check_manifests_agree(run_manifest: Mapping[str, Any], embedded: Mapping[str, Any], source: str) -> None:
    """UsageError unless a run file's embedded manifest has the run manifest's classes and input
    block: the run manifest decides what is served, and a file made for other classes or other
    preprocessing (a file copied in from another run, an edited manifest) would be served wrong."""
    run_classes = run_manifest.get("classes") or []
    file_classes = embedded.get("classes") or []
    if run_classes and file_classes and list(run_classes) != list(file_classes):
        if sorted(run_classes) == sorted(file_classes):
            how = "in another order"
        else:
            how = f"{len(file_classes)} classes against the run's {len(run_classes)}, not the same names"
        raise UsageError(
            f"{source}: its embedded manifest lists the run's classes {how}; the run's manifest.json"
            " and the file disagree on what each output means (re-export the file)"
        )
    if run_manifest.get("input") and embedded.get("input"):
        run_spec, file_spec = input_spec(run_manifest), input_spec(embedded)
        if run_spec != file_spec:
            raise UsageError(
                f"{source}: its embedded manifest's input block {file_spec} differs from the run's"
                f" {run_spec}; the file was exported with other preprocessing (re-export it)"
            )


def check_output_width(manifest: Mapping[str, Any], width: int | None, source: str) -> None:
    """UsageError when a model's output width (None: not fixed in the file) is not the manifest's
    class count: labels would be read against the wrong logits."""
    classes = manifest.get("classes") or []
    count = len(classes) or model_block(manifest, "student", source).num_classes
    if width is not None and count is not None and count != width:
        raise UsageError(f"{source}: the model gives {width} logits but the manifest has {count} classes")


def read_manifest(run_dir: str | os.PathLike[str]) -> Manifest:
    """Read and check a run's manifest; a missing or malformed file is a UsageError naming it."""
    path = manifest_path(run_dir)
    if not path.is_file():
        raise UsageError(f"{path}: no manifest.json; expected a run directory written by reviewkd")
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable JSON manifest ({exc})") from exc
    return check_manifest(data, str(path))


def write_manifest(run_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write the manifest atomically and return its path."""
    path = manifest_path(run_dir)
    write_json_atomic(path, manifest)
    return path


def artifact_path(run_dir: str | os.PathLike[str], relpath: str) -> Path:
    """The file a manifest key names, after proving it lies inside the run directory.

    The key must be relative without ".."; the path, symlinks resolved, must stay inside the
    resolved run directory. Nothing is opened: callers hash or load the file only after this.
    """
    check_artifact_key(relpath)
    root = Path(run_dir).resolve()
    path = Path(run_dir) / relpath
    if not path.resolve().is_relative_to(root):
        raise UsageError(
            f"{path}: resolves outside the run directory {root} (a symlink?); the manifest only vouches"
            " for files inside the run"
        )
    return path


def record_artifact(
    run_dir: str | os.PathLike[str], manifest: Manifest, relpath: str, kind: str, **meta: Any
) -> ArtifactEntry:
    """Hash a file of the run and record it (path, sha256, size, kind, extra metadata)."""
    path = artifact_path(run_dir, relpath)
    if not path.is_file():
        raise UsageError(f"{path}: cannot record a missing artifact")
    entry = cast(
        ArtifactEntry, {"sha256": sha256_file(path), "size_bytes": path.stat().st_size, "kind": kind, **meta}
    )
    manifest.setdefault("artifacts", {})[relpath] = entry
    return entry


def forget_artifact(manifest: Manifest, relpath: str) -> None:
    """Drop an artifact's entry (the file was removed or renamed)."""
    manifest.setdefault("artifacts", {}).pop(relpath, None)


def verify_artifact(run_dir: str | os.PathLike[str], manifest: Manifest, relpath: str) -> Path:
    """Return the artifact's path after checking that it lies in the run and its sha256 matches;
    an ONNX file must also hold all its weights (no external data, which the sha256 would miss)."""
    entry = manifest.get("artifacts", {}).get(relpath)
    if entry is None:
        raise UsageError(f"{Path(run_dir) / relpath}: not listed in {manifest_path(run_dir)}")
    path = artifact_path(run_dir, relpath)
    if not path.is_file():
        raise UsageError(f"{path}: listed in the manifest but missing")
    onnx = entry["kind"] == "onnx" or path.suffix == ".onnx"
    data = path.read_bytes() if onnx else None
    actual = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    if actual != entry["sha256"]:
        raise UsageError(
            f"{path}: sha256 {actual[:12]}… does not match the manifest's {entry['sha256'][:12]}…;"
            " the file changed after it was recorded"
        )
    if data is not None:  # the sha256 covers this file alone: no weights may lie in others
        check_self_contained_onnx(path, data)
    return path


def artifacts_of_kind(manifest: Manifest, kind: str) -> dict[str, ArtifactEntry]:
    """Return the manifest's artifacts of one kind, keyed by relative path."""
    return {rel: e for rel, e in manifest.get("artifacts", {}).items() if e["kind"] == kind}
