"""Classify image files: open what the user pointed at, then run it; the manifest supplies
preprocessing and class names.

`open_target` opens a run directory (its fp32 ONNX file, or the file a backend names) or a model
file (checked against the run that lists it, or carrying its manifest in its metadata); `predict`
classifies images with the runner.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deploy import run_layout
from deploy.errors import UsageError, printable
from deploy.fileio import verify_onnx_content
from deploy.formats import ALL_BACKENDS, MODULE_BACKENDS, export_advice, format_keys
from deploy.manifest import (
    InputSpec,
    Manifest,
    check_output_width,
    input_spec,
    model_block,
    read_manifest,
)
from deploy.preprocess import load_image
from deploy.runners import OnnxRuntimeRunner, open_runner, select_artifact
from deploy.runners.base import Runner

DEFAULT_BACKEND = "onnxruntime/fp32"
# How many folders above a model file to look for the run it belongs to (RUN/export/FILE).
RUN_SEARCH_DEPTH = 3

# Opens a run's student in-process: (run directory, manifest, precision, device) -> runner.
# Supplied by the caller (reviewkd builds the model), because deploy never imports torch.
ModuleOpener = Callable[[Path, Manifest, str, str], Runner]

# Images per forward pass when the runner accepts any batch: small enough for any device.
DEFAULT_BATCH = 32
# Key of a manifest artifact entry: the sha256 of the student.safetensors export made it from.
STUDENT_SHA256_KEY = "student_sha256"

Prediction = list[tuple[str, float]]


def check_export_is_current(
    run_dir: str | os.PathLike[str], manifest: Mapping[str, Any], relpath: str
) -> None:
    """UsageError when the run's student changed (retraining) after `relpath` was exported from it.

    Export records the student's sha256 with each file; a file recording another student, or
    none, would serve an old model under the new one's name. A run that records no trained
    student (a folder laid out by hand) has nothing to compare with.
    """
    current = model_block(manifest, "student").sha256
    if not current:
        return
    entry = (manifest.get("artifacts") or {}).get(relpath)
    recorded = entry.get(STUDENT_SHA256_KEY) if isinstance(entry, Mapping) else None
    if recorded == current:
        return
    path = Path(run_dir) / relpath
    if recorded is None:
        found = "the manifest does not record which student it was exported from"
    else:
        found = (
            f"it was exported from student {str(recorded)[:12]}…, the run's student is now {current[:12]}…"
        )
    key = next((k for k, rel in format_keys(manifest.get("artifacts") or {}).items() if rel == relpath), None)
    raise UsageError(f"{path}: {found}; re-export it with {export_advice(run_dir, key)}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so large logits cannot overflow."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def class_names(manifest: Mapping[str, Any], num_classes: int) -> list[str]:
    """The manifest's class names for `num_classes` logits; label indices when it lists none."""
    names = [str(c) for c in manifest.get("classes") or []]
    if not names:
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise UsageError(f"the model gives {num_classes} logits but the manifest lists {len(names)} classes")
    return names


def predict(
    runner: Runner,
    manifest: Mapping[str, Any],
    image_paths: Sequence[str | os.PathLike[str]],
    top_k: int = 5,
) -> list[Prediction]:
    """Return, per image and in order, the `top_k` (class name, probability) pairs, most likely first.

    Images are read and preprocessed as the manifest's "input" block says. A missing or
    unreadable image is a UsageError naming it; `top_k` larger than the class count is cut to it.
    """
    results = predict_each(runner, manifest, image_paths, top_k)
    for result in results:
        if isinstance(result, UsageError):
            raise result
    return [result for result in results if not isinstance(result, UsageError)]


def checked_input(
    runner: Runner, manifest: Mapping[str, Any], image_paths: Sequence[str | os.PathLike[str]]
) -> InputSpec:
    """The manifest's input block for a predict call over `image_paths`, after checking that there are
    images and that the runner takes the (C, H, W) the manifest says (a UsageError otherwise)."""
    if not image_paths:
        raise UsageError("no image files given")
    spec = input_spec(manifest)
    if spec.shape != tuple(runner.input_shape):
        raise UsageError(
            f"{runner.name}: the model takes (C, H, W) = {tuple(runner.input_shape)},"
            f" the manifest says {spec.shape}"
        )
    return spec


def predict_each(
    runner: Runner,
    manifest: Mapping[str, Any],
    image_paths: Sequence[str | os.PathLike[str]],
    top_k: int = 5,
) -> list[Prediction | UsageError]:
    """As `predict`, but an image that cannot be read takes its UsageError as its result, and the
    other images are still classified: one bad file among many does not cost the rest."""
    if top_k < 1:
        raise UsageError(f"--top-k: expected a positive number, got {top_k}")
    spec = checked_input(runner, manifest, image_paths)
    results: list[Prediction | UsageError] = []
    readable: list[np.ndarray] = []
    for path in image_paths:
        try:
            readable.append(load_image(path, spec))
            results.append([])  # filled in below, in order
        except UsageError as exc:
            results.append(exc)
    if not readable:
        return results
    images = np.stack(readable)
    chunk = runner.max_batch or DEFAULT_BATCH
    logits = np.concatenate(
        [_infer_padded(runner, images[i : i + chunk]) for i in range(0, len(images), chunk)]
    )
    probabilities = softmax(logits)
    names = class_names(manifest, probabilities.shape[1])
    k = min(top_k, len(names))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    tops = iter(
        [[(names[j], float(row[j])) for j in top] for row, top in zip(probabilities, order, strict=True)]
    )
    return [result if isinstance(result, UsageError) else next(tops) for result in results]


def pad_to_min_batch(runner: Runner, images: np.ndarray) -> tuple[np.ndarray, int]:
    """`images` padded with zero images up to the runner's smallest accepted batch, and how many of
    the returned rows are real."""
    count = len(images)
    if count >= runner.min_batch:
        return images, count
    padding = np.zeros((runner.min_batch - count, *images.shape[1:]), dtype=images.dtype)
    return np.concatenate([images, padding]), count


def _infer_padded(runner: Runner, images: np.ndarray) -> np.ndarray:
    """Infer a batch, padding it up to the runner's smallest accepted batch (`pad_to_min_batch`)."""
    padded, count = pad_to_min_batch(runner, images)
    return runner.infer(padded)[:count]


def predictions_table(paths: Sequence[Path], results: Sequence[Prediction | UsageError]) -> str:
    """The top-k classes of each image, one row per class; names escaped (deploy.errors.printable)
    so a file or class name cannot forge a row."""
    rows = [("IMAGE", "#", "CLASS", "PROBABILITY")]
    for path, top in zip(paths, results, strict=True):
        if isinstance(top, UsageError):
            rows.append((printable(str(path)), "-", printable(f"error: {top}"), ""))
            continue
        for rank, (name, probability) in enumerate(top, start=1):
            shown = printable(str(path)) if rank == 1 else ""
            rows.append((shown, str(rank), printable(name), f"{probability:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}".rstrip()
        for row in rows
    )


class TaskPredictor(Protocol):
    """What `reviewkd predict` does with one task's model (deploy.task_serving): run it on image
    files, and show each image's result as JSON, as a table, and (where the task has something to
    draw) drawn onto the image. A result is the task's own object, or the UsageError of an image
    that could not be read."""

    def predict_each(
        self, runner: Runner, manifest: Mapping[str, Any], image_paths: Sequence[Path], top_k: int
    ) -> Sequence[Any]:
        """One result per image, in order (see `predict_each` for the classifier's)."""
        ...

    def as_json(self, result: Any) -> dict[str, Any]:
        """One image's result as the JSON object printed for it (without the image's name)."""
        ...

    def table(self, paths: Sequence[Path], results: Sequence[Any]) -> str:
        """The results as a table for a terminal."""
        ...

    def draw(self, paths: Sequence[Path], results: Sequence[Any], save_dir: Path) -> list[Path]:
        """Write each readable image with its result drawn into `save_dir`; return the files written.
        UsageError where the task has nothing to draw."""
        ...


class ClassificationPredictor:
    """A classifier's predictions: the top-k (class, probability) pairs of each image."""

    def predict_each(
        self, runner: Runner, manifest: Mapping[str, Any], image_paths: Sequence[Path], top_k: int
    ) -> list[Prediction | UsageError]:
        return predict_each(runner, manifest, image_paths, top_k)

    def as_json(self, result: Prediction) -> dict[str, Any]:
        return {"top_k": [{"class": name, "probability": probability} for name, probability in result]}

    def table(self, paths: Sequence[Path], results: Sequence[Prediction | UsageError]) -> str:
        return predictions_table(paths, results)

    def draw(self, paths: Sequence[Path], results: Sequence[Any], save_dir: Path) -> list[Path]:
        raise UsageError(
            f"--save-dir {save_dir}: draws a detector's boxes; a classifier's predictions are only printed"
        )


def parse_backend(key: str) -> tuple[str, str]:
    """Split "BACKEND/PRECISION" (e.g. "onnxruntime/int8") into its parts; UsageError if malformed."""
    backend, _, precision = key.partition("/")
    if backend not in ALL_BACKENDS or not precision:
        raise UsageError(
            f"--backend {key!r}: expected <backend>/<precision> with backend {', '.join(ALL_BACKENDS)}"
        )
    return backend, precision


def _enclosing_run(model_file: Path) -> tuple[Path, Manifest] | None:
    """The run directory whose manifest lists `model_file`, looking a few folders up."""
    resolved = model_file.resolve()
    for parent in list(resolved.parents)[:RUN_SEARCH_DEPTH]:
        if run_layout.run_path(parent, run_layout.MANIFEST).is_file():
            manifest = read_manifest(parent)
            if resolved.relative_to(parent).as_posix() in manifest.get("artifacts", {}):
                return parent, manifest
    return None


def open_target(
    target: str | os.PathLike[str],
    backend: str | None = None,
    *,
    device: str = "cpu",
    threads: int | None = None,
    open_module: ModuleOpener | None = None,
) -> tuple[Runner, Mapping[str, Any]]:
    """Open what `reviewkd predict` was pointed at; return the runner and the manifest to read.

    target: a run directory, whose file for `backend` ("<backend>/<precision>", default
        DEFAULT_BACKEND) is opened after its hash check; or a model file, checked against the run
        that lists it, else read with the manifest embedded in its metadata.
    open_module: opens the run's student for the "torch" backend; None means torch is not
        available to this caller.
    """
    path = Path(target)
    if path.is_dir():
        manifest = read_manifest(path)
        name, precision = parse_backend(backend or DEFAULT_BACKEND)
        if name in MODULE_BACKENDS:
            if open_module is None:
                raise UsageError(f"--backend {backend}: this caller cannot run the student in-process")
            return open_module(path, manifest, precision, device), manifest
        relpath = select_artifact(path, manifest, name, precision)
        check_export_is_current(path, manifest, relpath)
        runner = open_runner(relpath, manifest=manifest, run_dir=path, device=device, threads=threads)
        return runner, manifest
    if not path.is_file():
        raise UsageError(f"{path}: no such run directory or model file")
    if backend is not None:
        raise UsageError(
            "--backend picks a file of a run directory; a model file's suffix decides its backend"
        )
    found = _enclosing_run(path)
    if found is not None:
        run, manifest = found
        check_export_is_current(run, manifest, path.resolve().relative_to(run).as_posix())
        return open_runner(path, manifest=manifest, run_dir=run, device=device, threads=threads), manifest
    if path.suffix.lower() == ".onnx":
        verify_onnx_content(path)
    runner = open_runner(path, device=device, threads=threads)
    try:
        embedded = runner.embedded_manifest() if isinstance(runner, OnnxRuntimeRunner) else None
        if embedded is None:
            raise UsageError(
                f"{path}: no run manifest lists it and it carries none in its metadata;"
                " keep it in its run directory (RUN/export/) or pass the run directory"
            )
        check_output_width(embedded, runner.output_width, str(path))
    except UsageError:
        runner.close()
        raise
    return runner, embedded
