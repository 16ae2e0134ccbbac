"""A validated, immutable detection dataset description, read from COCO JSON or YOLO txt folders.

A `DetectionDataset` lists image files with, per image, boxes (x1, y1, x2, y2 in pixels, float32)
and contiguous class indices 0..K-1 (int64); `category_ids` maps each class index back to the
source's own category id (COCO ids may be any distinct integers; YOLO's are the indices themselves).

Policy for boxes, the same for both readers:
- a box reaching past the image is clipped to it, and counted in `clipped_boxes` (labelling tools
  routinely leave boxes a pixel or a rounding error outside the image);
- a box of zero or negative width or height, before or after clipping (so one wholly outside the
  image), is refused: it marks nothing, and a silent drop would hide a broken export.
Images without boxes are kept: they are the negatives a detector learns background from.

Every defect is a UsageError of one line naming the file and what was expected. Nothing here needs
torch: the edge install validates detectors with it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from deploy.errors import UsageError
from deploy.fileio import write_json_atomic

# Image files a YOLO images/ folder may hold (what Ultralytics and the labelling tools write).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Class-name files a YOLO dataset may carry, looked for in this order in the dataset's root, then
# CLASSES_TXT in the labels folder, where LabelImg writes it.
YOLO_CLASS_FILES = ("data.yaml", "classes.txt")
CLASSES_TXT = "classes.txt"
_YOLO_FIELDS = 5


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class ImageAnnotation:
    """One image: its file, its size in pixels and its boxes.

    `boxes` is (N, 4) float32 x1, y1, x2, y2 in pixels; `labels` (N,) int64 class indices;
    `crowd` (N,) bool, COCO's `iscrowd` (a region of many objects: the COCO metric ignores
    detections in it, training skips it); all read-only, N may be 0.
    """

    image_id: int
    file: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray


@dataclass(frozen=True)
class DetectionDataset:
    """Images with their boxes, and the classes: see the module docstring for the policy.

    `class_names[i]` names class index i, and `category_ids[i]` is its id in the source file.
    `clipped_boxes` counts the boxes clipped to their image while reading, for the caller to report.
    """

    source: Path
    images: tuple[ImageAnnotation, ...]
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    clipped_boxes: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_boxes(self) -> int:
        return sum(len(image.labels) for image in self.images)

    def summary(self) -> str:
        """One line for a log: images, boxes, classes, negatives and clipped boxes."""
        negatives = sum(1 for image in self.images if len(image.labels) == 0)
        return (
            f"{self.source}: {len(self.images)} images ({negatives} without boxes), {self.num_boxes} boxes,"
            f" {self.num_classes} classes, {self.clipped_boxes} boxes clipped to their image"
        )


class _BoxChecker:
    """Clip boxes to their image, refuse degenerate ones, and count the clipped ones."""

    def __init__(self) -> None:
        self.clipped = 0

    def clip(self, box: Sequence[float], width: int, height: int, where: str) -> list[float]:
        x1, y1, x2, y2 = box
        if not all(math.isfinite(v) for v in box):
            raise UsageError(f"{where}: box {list(box)} holds a non-finite number")
        if x2 <= x1 or y2 <= y1:
            raise UsageError(f"{where}: box {_fmt(box)} has zero or negative width or height")
        clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
        clipped += [min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            raise UsageError(f"{where}: box {_fmt(box)} lies wholly outside the {width}x{height} image")
        if clipped != [x1, y1, x2, y2]:
            self.clipped += 1
        return clipped


def _fmt(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _image_record(
    image_id: int,
    file: Path,
    width: int,
    height: int,
    boxes: list[list[float]],
    labels: list[int],
    crowd: list[bool],
) -> ImageAnnotation:
    return ImageAnnotation(
        image_id=image_id,
        file=file,
        width=width,
        height=height,
        boxes=_frozen(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
        labels=_frozen(np.asarray(labels, dtype=np.int64)),
        crowd=_frozen(np.asarray(crowd, dtype=bool)),
    )


# --- COCO JSON -----------------------------------------------------------------------------------------


def _load_json(file: Path) -> Any:
    if not file.is_file():
        raise UsageError(f"annotation file {file} not found")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"annotation file {file} cannot be read as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise UsageError(f"annotation file {file} is empty; expected COCO-format JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"annotation file {file} is not valid JSON ({exc})") from exc


def _int_field(entry: Any, key: str, where: str, *, positive: bool = False) -> int:
    value = entry.get(key) if isinstance(entry, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
        kind = "a positive integer" if positive else "an integer"
        raise UsageError(f"{where}: '{key}' is {value!r}; expected {kind}")
    return value


def _entries(data: Mapping[str, Any], key: str, file: Path) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise UsageError(f"{file}: '{key}' is missing or not a list; expected COCO-format JSON")
    return value


def read_coco(
    annotation_file: str | os.PathLike[str], image_dir: str | os.PathLike[str] | None = None
) -> DetectionDataset:
    """Read a COCO-format detection file: `images`, `annotations` (bbox [x, y, w, h]) and `categories`.

    Image files are `image_dir / file_name` (default: the annotation file's folder) and must exist;
    their sizes are the JSON's `width` and `height` (not read from the files, so reading COCO's
    118k training images stays fast). Categories become class indices in increasing id order.

    Raises:
        UsageError: the file is missing, empty or malformed; an image or category id is repeated;
            an annotation names an unknown image or category, or holds a degenerate box; an image
            file is missing.
    """
    file = Path(annotation_file)
    root = Path(image_dir) if image_dir is not None else file.parent
    data = _load_json(file)
    if not isinstance(data, Mapping):
        raise UsageError(f"{file}: top level is {type(data).__name__}; expected a COCO-format JSON object")
    raw_images = _entries(data, "images", file)
    raw_annotations = _entries(data, "annotations", file)
    raw_categories = _entries(data, "categories", file)
    if not raw_images:
        raise UsageError(f"{file}: 'images' is empty; expected at least one image")
    if not raw_categories:
        raise UsageError(f"{file}: 'categories' is empty; expected at least one category")

    names_by_id: dict[int, str] = {}
    for index, category in enumerate(raw_categories):
        where = f"{file}: categories[{index}]"
        category_id = _int_field(category, "id", where)
        name = category.get("name")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}: 'name' is {name!r}; expected a non-empty string")
        if category_id in names_by_id:
            raise UsageError(f"{where}: category id {category_id} is repeated; expected distinct ids")
        names_by_id[category_id] = name
    category_ids = tuple(sorted(names_by_id))
    class_of = {category_id: index for index, category_id in enumerate(category_ids)}

    meta: dict[int, tuple[Path, int, int]] = {}
    for index, image in enumerate(raw_images):
        where = f"{file}: images[{index}]"
        image_id = _int_field(image, "id", where)
        width = _int_field(image, "width", where, positive=True)
        height = _int_field(image, "height", where, positive=True)
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}: 'file_name' is {name!r}; expected a path relative to {root}")
        if image_id in meta:
            raise UsageError(f"{where}: image id {image_id} is repeated; expected distinct ids")
        path = root / name
        if not path.is_file():
            raise UsageError(f"{where}: image file {path} not found")
        meta[image_id] = (path, width, height)

    checker = _BoxChecker()
    per_image: dict[int, tuple[list[list[float]], list[int], list[bool]]] = {i: ([], [], []) for i in meta}
    for index, annotation in enumerate(raw_annotations):
        where = f"{file}: annotations[{index}]"
        image_id = _int_field(annotation, "image_id", where)
        category_id = _int_field(annotation, "category_id", where)
        if image_id not in meta:
            raise UsageError(f"{where}: image_id {image_id} is not in 'images'")
        if category_id not in class_of:
            raise UsageError(
                f"{where}: category_id {category_id} is not in 'categories' (ids {list(category_ids)})"
            )
        bbox = annotation.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        ):
            raise UsageError(f"{where}: 'bbox' is {bbox!r}; expected [x, y, width, height] in pixels")
        x, y, w, h = (float(v) for v in bbox)
        _, width, height = meta[image_id]
        boxes, labels, crowd = per_image[image_id]
        boxes.append(checker.clip((x, y, x + w, y + h), width, height, where))
        labels.append(class_of[category_id])
        crowd.append(bool(annotation.get("iscrowd", 0)))

    images = tuple(
        _image_record(image_id, path, width, height, *per_image[image_id])
        for image_id, (path, width, height) in meta.items()
    )
    return DetectionDataset(
        source=file,
        images=images,
        class_names=tuple(names_by_id[i] for i in category_ids),
        category_ids=category_ids,
        clipped_boxes=checker.clipped,
    )


def write_coco(
    dataset: DetectionDataset,
    annotation_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Write `dataset` as COCO-format JSON (temporary file, then rename), `read_coco`'s inverse.

    `file_name`s are relative to `image_dir` (default: the annotation file's folder), which must
    hold every image. Categories keep their `category_ids`; annotation ids run from 1.

    Raises:
        UsageError: an image lies outside `image_dir`.
        OutputError: the file cannot be written.
    """
    file = Path(annotation_file)
    root = Path(image_dir) if image_dir is not None else file.parent
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image in dataset.images:
        try:
            name = image.file.resolve().relative_to(root.resolve()).as_posix()
        except ValueError as exc:
            raise UsageError(f"{file}: image {image.file} is not inside the image folder {root}") from exc
        images.append({"id": image.image_id, "file_name": name, "width": image.width, "height": image.height})
        for box, label, crowd in zip(
            image.boxes.tolist(), image.labels.tolist(), image.crowd.tolist(), strict=True
        ):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image.image_id,
                    "category_id": dataset.category_ids[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(crowd),
                }
            )
    categories = [
        {"id": category_id, "name": name}
        for category_id, name in zip(dataset.category_ids, dataset.class_names, strict=True)
    ]
    write_json_atomic(file, {"images": images, "annotations": annotations, "categories": categories})


# --- YOLO txt folders ----------------------------------------------------------------------------------


def _labels_dir(images_dir: Path) -> Path:
    """Ultralytics' rule: the labels folder is the images folder with its last `images` part renamed."""
    parts = list(images_dir.parts)
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            return Path(*parts)
    raise UsageError(
        f"YOLO images folder {images_dir} has no 'images' part in its path; expected images/ and labels/"
        " side by side (root/images[/split] and root/labels[/split])"
    )


def _yolo_root(images_dir: Path) -> Path:
    parts = images_dir.parts
    last = max(i for i, part in enumerate(parts) if part == "images")
    return Path(*parts[:last]) if last else Path(".")


def _read_class_names(file: Path) -> tuple[str, ...]:
    """Class names from a data.yaml (`names:` as a list, or a mapping of 0..K-1) or a classes.txt."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"class names file {file} cannot be read as UTF-8 text ({exc})") from exc
    if file.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(
                f"class names file {file} is not valid YAML ({' '.join(str(exc).split())})"
            ) from exc
        names = data.get("names") if isinstance(data, Mapping) else None
        if isinstance(names, Mapping) and sorted(names) == list(range(len(names))):
            names = [names[i] for i in range(len(names))]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise UsageError(
                f"class names file {file}: 'names' is {names!r}; expected a non-empty list of names"
                " or a mapping of 0..K-1 to names"
            )
        return tuple(names)
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UsageError(f"class names file {file} is empty; expected one class name a line")
    return tuple(names)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"image file {path} cannot be read as an image ({exc})") from exc


def read_yolo(
    images_dir: str | os.PathLike[str], classes_file: str | os.PathLike[str] | None = None
) -> DetectionDataset:
    """Read a YOLO txt dataset: images in `images_dir`, one `<stem>.txt` per image in the labels folder.

    The labels folder is `images_dir` with its last `images` part replaced by `labels` (Ultralytics'
    layout: root/images/train and root/labels/train, or root/images and root/labels). Each label
    line is `class cx cy w h`, the box normalised by the image's size; an image without a label file,
    or with an empty one, has no boxes. Class names come from `classes_file`, else from the first of
    root/data.yaml (`names:`), root/classes.txt and the labels folder's classes.txt (LabelImg's
    place) that exists. Image ids are 1.. in file name order;
    sizes are read from the image files' headers.

    Raises:
        UsageError: a folder or the class names are missing; a label file has no image; a label line
            has the wrong number of fields, a non-number, a class out of range or a degenerate box.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise UsageError(f"YOLO images folder {folder} not found")
    labels_dir = _labels_dir(folder)
    if not labels_dir.is_dir():
        raise UsageError(f"YOLO labels folder {labels_dir} not found (beside images folder {folder})")
    if classes_file is None:
        root = _yolo_root(folder)
        candidates = [root / name for name in YOLO_CLASS_FILES] + [labels_dir / CLASSES_TXT]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UsageError(
                f"YOLO dataset {root} has no class names: expected {' or '.join(map(str, candidates))}"
            )
        classes_file = found
    class_names = _read_class_names(Path(classes_file))

    image_files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not image_files:
        raise UsageError(f"YOLO images folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    stems = {p.stem for p in image_files}
    if len(stems) != len(image_files):
        raise UsageError(
            f"YOLO images folder {folder} holds two images of the same name with different suffixes"
        )
    orphans = sorted(p for p in labels_dir.glob("*.txt") if p.stem not in stems and p.name != CLASSES_TXT)
    if orphans:
        raise UsageError(f"YOLO label file {orphans[0]} has no image in {folder}")

    checker = _BoxChecker()
    images = []
    for image_id, path in enumerate(image_files, start=1):
        width, height = _image_size(path)
        label_file = labels_dir / f"{path.stem}.txt"
        boxes: list[list[float]] = []
        labels: list[int] = []
        if label_file.is_file():
            try:
                lines = label_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(
                    f"YOLO label file {label_file} cannot be read as UTF-8 text ({exc})"
                ) from exc
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"YOLO label file {label_file} line {line_number}"
                fields = line.split()
                if len(fields) != _YOLO_FIELDS:
                    raise UsageError(
                        f"{where}: {len(fields)} fields; expected 5 (class cx cy w h, normalised to 0-1)"
                    )
                try:
                    class_value = float(fields[0])
                    cx, cy, w, h = (float(v) for v in fields[1:])
                except ValueError as exc:
                    raise UsageError(f"{where}: '{line.strip()}' holds a non-number") from exc
                if not class_value.is_integer() or not 0 <= class_value < len(class_names):
                    raise UsageError(
                        f"{where}: class {fields[0]} is not a class index 0..{len(class_names) - 1}"
                        f" ({len(class_names)} names in {classes_file})"
                    )
                box = (
                    (cx - w / 2) * width,
                    (cy - h / 2) * height,
                    (cx + w / 2) * width,
                    (cy + h / 2) * height,
                )
                boxes.append(checker.clip(box, width, height, where))
                labels.append(int(class_value))
        images.append(_image_record(image_id, path, width, height, boxes, labels, [False] * len(labels)))
    return DetectionDataset(
        source=folder,
        images=tuple(images),
        class_names=class_names,
        category_ids=tuple(range(len(class_names))),
        clipped_boxes=checker.clipped,
    )
