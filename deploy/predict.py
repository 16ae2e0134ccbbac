"""Classify image files with any runner: the manifest supplies preprocessing and class names."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploy.errors import UsageError
from deploy.preprocess import InputSpec, load_images
from deploy.runners.base import Runner

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
    student = manifest.get("student")
    current = student.get("sha256") if isinstance(student, Mapping) else None
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
    raise UsageError(f"{path}: {found}; re-export it with `reviewkd export {run_dir}`")


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
    if top_k < 1:
        raise UsageError(f"--top-k: expected a positive number, got {top_k}")
    spec = InputSpec.from_manifest(manifest)
    if spec.shape != tuple(runner.input_shape):
        raise UsageError(
            f"{runner.name}: the model takes (C, H, W) = {tuple(runner.input_shape)},"
            f" the manifest says {spec.shape}"
        )
    images = load_images(image_paths, spec)
    chunk = runner.max_batch or DEFAULT_BATCH
    logits = np.concatenate(
        [_infer_padded(runner, images[i : i + chunk]) for i in range(0, len(images), chunk)]
    )
    probabilities = softmax(logits)
    names = class_names(manifest, probabilities.shape[1])
    k = min(top_k, len(names))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(names[j], float(row[j])) for j in top] for row, top in zip(probabilities, order, strict=True)]


def _infer_padded(runner: Runner, images: np.ndarray) -> np.ndarray:
    """Infer a batch, padding it with zero images up to the runner's smallest accepted batch."""
    count = len(images)
    if count >= runner.min_batch:
        return runner.infer(images)
    padding = np.zeros((runner.min_batch - count, *images.shape[1:]), dtype=images.dtype)
    return runner.infer(np.concatenate([images, padding]))[:count]
