"""The embedded detection default: scikit-learn's bundled 8x8 digits placed on canvases, written to disk.

Needs no download. A seeded generator scales digits up to random sizes, places a few on each canvas
with little overlap, tints them, and writes PNG images plus a COCO JSON per split (train, val), so
that the real COCO reader (deploy.detection.annotations.read_coco) is what runs. The val split draws
its digits from a fifth of the bundled set that train never uses.

The tree is written once: an `index.json` records the spec and the sha256 of every file, and a
later call with the same spec finds it complete and leaves it alone. A tree that is incomplete,
altered, or made from another spec is written again, whole, in a temporary folder renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from deploy.detection.annotations import DetectionDataset, ImageAnnotation, write_coco
from deploy.errors import OutputError, UsageError
from deploy.fileio import sha256_file, write_json_atomic
from deploy.optional import optional_import

SPLITS = ("train", "val")
INDEX_NAME = "index.json"
ANNOTATION_NAME = "annotations.json"
CLASS_NAMES = tuple(str(digit) for digit in range(10))
# COCO category ids 1..10 rather than 0..9, so the reader's id-to-index mapping is exercised.
CATEGORY_IDS = tuple(range(1, 11))
# One digit in VAL_EVERY of the bundled set goes to val, the rest to train.
VAL_EVERY = 5
# A digit's box is where its ink covers at least this fraction of full intensity.
INK_THRESHOLD = 0.25
PLACEMENT_TRIES = 30
# A scaled digit's width over its height is uniform in MIN_WIDTH_RATIO..1 (digits stand upright).
MIN_WIDTH_RATIO = 0.6
_DIGIT_MAX = 16.0  # load_digits' intensity range is 0..16


@dataclass(frozen=True)
class DigitsDetectionSpec:
    """What the generator makes; every field is recorded in the index.

    Args:
        seed: seeds the generator; the same spec always gives the same bytes.
        train_images, val_images: canvases per split.
        height, width: canvas size in pixels (non-square by default).
        min_digits, max_digits: digits tried per canvas (a digit that finds no place with IoU at
            most `max_iou` against those already placed is left out).
        min_size, max_size: height of a scaled digit in pixels (its width is MIN_WIDTH_RATIO to 1
            times that), before its tight box is taken.
        max_iou: the most two digits' boxes may overlap.
    """

    seed: int = 0
    train_images: int = 512
    val_images: int = 128
    height: int = 64
    width: int = 96
    min_digits: int = 1
    max_digits: int = 4
    min_size: int = 14
    max_size: int = 36
    max_iou: float = 0.1

    def __post_init__(self) -> None:
        if self.train_images < 1 or self.val_images < 1:
            raise UsageError("digits detection: train_images and val_images must be at least 1")
        if not 1 <= self.min_digits <= self.max_digits:
            raise UsageError("digits detection: expected 1 <= min_digits <= max_digits")
        if not 8 <= self.min_size <= self.max_size <= min(self.height, self.width):
            raise UsageError(
                f"digits detection: expected 8 <= min_size <= max_size <= {min(self.height, self.width)}"
                " (the canvas's shorter side)"
            )


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    top_left = np.maximum(box[:2], others[:, :2])
    bottom_right = np.minimum(box[2:], others[:, 2:])
    overlap = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    return np.asarray(overlap / (area + areas - overlap))


def _canvas(
    rng: np.random.Generator, spec: DigitsDetectionSpec, digits: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, list[list[float]], list[int]]:
    """One uint8 RGB canvas with its digits' tight boxes and classes."""
    background = rng.uniform(0.0, 0.35, size=3)
    canvas = np.clip(background + rng.normal(0.0, 0.04, size=(spec.height, spec.width, 3)), 0.0, 1.0)
    boxes: list[list[float]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(spec.min_digits, spec.max_digits + 1))):
        source = int(rng.integers(len(digits)))
        patch_h = int(rng.integers(spec.min_size, spec.max_size + 1))
        patch_w = max(8, round(patch_h * rng.uniform(MIN_WIDTH_RATIO, 1.0)))
        ink_image = Image.fromarray(np.uint8(digits[source] / _DIGIT_MAX * 255))
        ink = np.asarray(ink_image.resize((patch_w, patch_h), Image.Resampling.BILINEAR), np.float64) / 255
        rows, cols = np.nonzero(ink >= INK_THRESHOLD)
        if rows.size == 0:
            continue
        colour = rng.uniform(0.6, 1.0, size=3)
        for _ in range(PLACEMENT_TRIES):
            top = int(rng.integers(spec.height - patch_h + 1))
            left = int(rng.integers(spec.width - patch_w + 1))
            box = np.array(
                [left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1], float
            )
            if not boxes or _iou(box, np.asarray(boxes)).max() <= spec.max_iou:
                break
        else:
            continue
        region = canvas[top : top + patch_h, left : left + patch_w]
        alpha = ink[:, :, None]
        canvas[top : top + patch_h, left : left + patch_w] = region * (1 - alpha) + colour * alpha
        boxes.append(box.tolist())
        classes.append(int(labels[source]))
    return np.round(canvas * 255).astype(np.uint8), boxes, classes


def _write_split(
    folder: Path,
    rng: np.random.Generator,
    spec: DigitsDetectionSpec,
    count: int,
    digits: np.ndarray,
    labels: np.ndarray,
) -> None:
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    records = []
    for index in range(count):
        pixels, boxes, classes = _canvas(rng, spec, digits, labels)
        path = images_dir / f"{index:06d}.png"
        Image.fromarray(pixels).save(path)
        records.append(
            ImageAnnotation(
                image_id=index + 1,
                file=path,
                width=spec.width,
                height=spec.height,
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                labels=np.asarray(classes, np.int64),
                crowd=np.zeros(len(classes), bool),
            )
        )
    dataset = DetectionDataset(
        source=folder / ANNOTATION_NAME,
        images=tuple(records),
        class_names=CLASS_NAMES,
        category_ids=CATEGORY_IDS,
        clipped_boxes=0,
    )
    write_coco(dataset, folder / ANNOTATION_NAME)


def _index_is_complete(root: Path, spec: DigitsDetectionSpec) -> bool:
    try:
        index = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if (
        not isinstance(index, dict)
        or index.get("spec") != asdict(spec)
        or not isinstance(index.get("files"), dict)
    ):
        return False
    files: dict[str, str] = index["files"]
    needed = {f"{split}/{ANNOTATION_NAME}" for split in SPLITS}
    if not needed <= files.keys():
        return False
    for name, digest in files.items():
        path = root / name
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def ensure_digits_detection(
    root: str | os.PathLike[str], spec: DigitsDetectionSpec | None = None
) -> dict[str, Path]:
    """Make (or find complete) the digits detection tree at `root`; return each split's COCO JSON path.

    Layout: root/index.json, root/<split>/annotations.json and root/<split>/images/NNNNNN.png for
    split in train, val; read each split with `read_coco(path)`.

    Raises:
        UsageError: `root` is a file, or a non-empty folder this generator did not write (it has no
            index.json), which is left untouched.
        OutputError: the tree cannot be written.
    """
    spec = spec or DigitsDetectionSpec()
    folder = Path(root)
    paths = {split: folder / split / ANNOTATION_NAME for split in SPLITS}
    if _index_is_complete(folder, spec):
        return paths
    if folder.exists() and (
        not folder.is_dir() or (any(folder.iterdir()) and not (folder / INDEX_NAME).is_file())
    ):
        raise UsageError(
            f"{folder}: cannot write the digits detection data set there; expected a missing or empty"
            f" folder, or one this generator wrote (it holds {INDEX_NAME})"
        )

    with optional_import("the embedded detection default (scikit-learn's digits)"):
        from sklearn.datasets import load_digits

    bundled = load_digits()
    digits, labels = np.asarray(bundled.images), np.asarray(bundled.target)
    is_val = np.arange(len(digits)) % VAL_EVERY == 0
    rng = np.random.default_rng(spec.seed)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as exc:
        raise OutputError.from_os_error(folder, exc) from exc
    try:
        for split, count, chosen in (("train", spec.train_images, ~is_val), ("val", spec.val_images, is_val)):
            _write_split(staging / split, rng, spec, count, digits[chosen], labels[chosen])
        files = {
            path.relative_to(staging).as_posix(): sha256_file(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        write_json_atomic(staging / INDEX_NAME, {"spec": asdict(spec), "files": files})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except OSError as exc:  # a full disk, a read-only folder: one line naming the data set's folder
        raise OutputError.from_os_error(folder, exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
