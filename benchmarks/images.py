"""Validation images without torch: an ImageFolder tree read with the manifest's preprocessing.

On the edge install (no torch, no torchvision) `reviewkd validate` reads a run's validation split
here when the run trained on an ImageFolder tree, or any folder given with `--data`: one
sub-folder per class, named as the manifest's classes. Images are preprocessed exactly as
`reviewkd predict` does (deploy.preprocess, mirroring the training's evaluation transform).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from deploy import run_layout
from deploy.errors import MissingDependencyError, UsageError
from deploy.manifest import InputSpec, Manifest, input_spec
from deploy.preprocess import load_images
from deploy.sampling import spread_indices
from reviewkd.config import load_run_config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_image_folder(folder: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Image files of `folder`/<class>/ in a stable order, with the index of their class in `classes`.

    UsageError for a missing folder, a class folder the model does not know, or no images at all.
    """
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (expected one sub-folder of images per class)")
    index = {name: i for i, name in enumerate(classes)}
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    unknown = [name for name in found if name not in index]
    if unknown:
        raise UsageError(f"{folder}: class folders {unknown} are not among the model's classes")
    files: list[Path] = []
    labels: list[int] = []
    for name in found:
        images = sorted(
            Path(e.path)
            for e in os.scandir(folder / name)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        files += images
        labels += [index[name]] * len(images)
    if not files:
        raise UsageError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return files, labels


def iter_folder_batches(
    folder: Path, spec: InputSpec, classes: Sequence[str], batch_size: int, limit: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 NCHW images, int64 labels) batches of an ImageFolder split, preprocessed per `spec`."""
    files, labels = scan_image_folder(folder, classes)
    chosen = spread_indices(len(files), limit)  # the images reviewkd.data reads for the same limit
    files, labels = [files[i] for i in chosen], [labels[i] for i in chosen]
    for start in range(0, len(files), batch_size):
        yield (
            load_images(files[start : start + batch_size], spec),
            np.asarray(labels[start : start + batch_size], dtype=np.int64),
        )


def run_validation_folder(run_dir: Path) -> Path:
    """The validation folder of a run trained on an ImageFolder tree, read from RUN/config.yaml.

    MissingDependencyError when the run's dataset (digits, CIFAR pickles) can only be read with
    torch: pass --data, or install the training extra.
    """
    data = load_run_config(run_dir).data
    if data.dataset != "imagefolder" or not data.root:
        raise MissingDependencyError(
            f"{run_layout.run_path(run_dir, run_layout.CONFIG)}: the {data.dataset} validation split is read"
            " with torch, which is not installed; pass --data FOLDER (one sub-folder of images per class;"
            f" `reviewkd export-data {run_dir} --out FOLDER` writes it where PyTorch is installed)"
            " or pip install 'reviewkd[train]'"
        )
    root = Path(data.root)
    names = (data.val_dir,) if data.val_dir else ("val", "test")
    folder = next((root / name for name in names if (root / name).is_dir()), None)
    if folder is None:
        raise UsageError(
            f"{root}: the run's validation images ({' or '.join(names)}/) are not on this machine;"
            " pass --data FOLDER (one sub-folder of images per class;"
            f" `reviewkd export-data {run_dir} --out FOLDER` writes it where the images are)"
        )
    return folder


def folder_batches(
    folder: Path, manifest: Manifest, batch_size: int, limit: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validation batches of `folder` for a run: its manifest's classes and preprocessing."""
    classes = manifest.get("classes", [])
    if not classes:
        raise UsageError("the manifest lists no classes to match the image folders against")
    return iter_folder_batches(folder, input_spec(manifest), classes, batch_size, limit)
