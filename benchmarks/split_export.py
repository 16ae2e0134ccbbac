"""Write a run's validation split as an image folder (OUT/<class>/<image>), so that a device without
the dataset, or without torch, can validate the run on the images it was validated on:
`reviewkd export-data RUN --out val/`, then `reviewkd validate RUN --data val/`.

An ImageFolder run's split is its own files, copied byte for byte, without torch. A digits or CIFAR
split exists only as the run's loader builds it (scikit-learn's digits, CIFAR's pickles, resized
with torch): it is rebuilt by reviewkd.data, which needs the training extra, and written as PNG files
of the pixels the network was evaluated on (already at its input size, so reading them back, as
validate and predict do, gives the same pixels).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.images import run_validation_folder, scan_image_folder
from deploy import run_layout
from deploy.errors import OutputError, UsageError
from deploy.manifest import manifest_path, read_manifest
from deploy.optional import optional_import, require_installed
from deploy.sampling import spread_indices
from reviewkd.config import load_run_config


@dataclass(frozen=True)
class WrittenSplit:
    """What export_validation_split wrote: where, how many images of how many classes, from what."""

    folder: Path
    images: int
    classes: int
    source: str  # "files of <folder>" or "<dataset> split rebuilt by reviewkd.data"


def _class_folder_names(classes: Sequence[str], source: str) -> list[str]:
    """The class names as folder names: each must be one plain path component, or UsageError."""
    if not classes:
        raise UsageError(f"{source}: lists no classes to name the image folders by")
    for index, name in enumerate(classes):
        if name in ("", ".", "..") or "/" in name or "\\" in name or not name.isprintable():
            raise UsageError(
                f"{source}: classes[{index}] {name!r} cannot name a folder (expected a name without"
                " '/', '\\', control characters, '.' or '..')"
            )
    if len(set(classes)) != len(classes):
        raise UsageError(f"{source}: class names repeat; each names a folder of its own")
    return list(classes)


def _check_out(run: Path, out: Path) -> None:
    """UsageError unless `out` is a new or empty folder outside the run."""
    if out.resolve().is_relative_to(run.resolve()):
        raise UsageError(f"--out {out}: inside the run {run}; write the images to a folder outside it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out}: not empty; give a new or empty folder (nothing is overwritten)")


def export_validation_split(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], limit: int | None = None
) -> WrittenSplit:
    """Write the run's validation split (with `limit`, that many images spread evenly over it, the
    images `reviewkd validate --limit` reads) to the new folder `out`, one sub-folder per class named
    as the manifest names it. The folder appears whole or not at all (written beside it, then renamed).

    Raises:
        UsageError: `out` is inside the run, not empty or not a folder; the manifest's classes cannot
            name folders or differ from the dataset's; the run's images cannot be read.
        MissingDependencyError: the split is a digits or CIFAR one and torch is not installed.
        OutputError: `out` cannot be written.
    """
    run, target = Path(run_dir), Path(out)
    manifest = read_manifest(run)
    classes = _class_folder_names(manifest.get("classes") or [], str(manifest_path(run)))
    if limit is not None and limit < 1:
        raise UsageError(f"--limit: expected a positive number, got {limit}")
    _check_out(run, target)
    dataset = load_run_config(run).data.dataset
    if dataset == "imagefolder":
        folder = run_validation_folder(run)
        files, all_labels = scan_image_folder(folder, classes)
        chosen = spread_indices(len(files), limit)
        labels = [all_labels[i] for i in chosen]
        sources = [files[i] for i in chosen]

        def write(stage: Path) -> None:
            for file, label in zip(sources, labels, strict=True):
                shutil.copyfile(file, stage / classes[label] / file.name)

        source = f"files of {folder}"
    else:
        require_installed(
            "torch", f"writing the {dataset} validation split (the run's loader rebuilds it with torch)"
        )

        images, label_array = _rebuilt_split(run, classes)
        chosen = spread_indices(len(label_array), limit)
        labels = [int(label_array[i]) for i in chosen]

        def write(stage: Path) -> None:
            for index, label in zip(chosen, labels, strict=True):
                pixels = np.ascontiguousarray(images[index].transpose(1, 2, 0))
                Image.fromarray(pixels, "RGB").save(stage / classes[label] / f"{index:05d}.png")

        source = f"{dataset} split rebuilt by reviewkd.data"
    _write_whole(target, classes, write)
    return WrittenSplit(target, len(labels), len(set(labels)), source)


def _write_whole(target: Path, classes: list[str], write: Callable[[Path], None]) -> None:
    """Run `write` on a staging folder beside `target` holding one empty folder per class, then rename
    it to `target`; on any failure nothing is left behind."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise OutputError.from_os_error(target, exc) from exc
    try:
        for name in classes:
            (stage / name).mkdir()
        write(stage)
        if target.is_dir():
            target.rmdir()  # empty (checked before): the rename below needs the name free
        os.replace(stage, target)
    except OSError as exc:
        raise OutputError.from_os_error(target, exc, aliases=(stage,)) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _rebuilt_split(run: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation split as its loader builds it: uint8 (N, 3, H, W) images and labels."""
    with optional_import("rebuilding the run's validation split"):
        from reviewkd.data import build_data

    bundle = build_data(load_run_config(run), cache=False)
    if bundle.classes != classes:
        raise UsageError(
            f"{manifest_path(run)}: its classes differ from those of the {bundle.dataset} dataset that"
            f" {run_layout.run_path(run, run_layout.CONFIG)} names"
        )
    held_out = bundle.held_out  # what `reviewkd validate` scores: the test split when val was carved
    assert held_out.images is not None  # digits and CIFAR splits live in memory
    return held_out.images.numpy(), held_out.labels.numpy()
