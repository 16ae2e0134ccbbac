"""Detection dataset descriptions from real COCO JSON and YOLO txt files in tmp dirs, and the bad ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deploy.detection.annotations import DetectionDataset, read_coco, read_yolo, write_coco
from deploy.errors import UsageError


def _png(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 80, dtype=np.uint8)).save(path)
    return path


def _coco(**changes: Any) -> dict[str, Any]:
    """Two images (40x30 and 20x50), three annotations, categories with non-contiguous ids 3 and 7."""
    data: dict[str, Any] = {
        "images": [
            {"id": 11, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 12, "file_name": "b.png", "width": 20, "height": 50},
        ],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [2, 3, 10, 5]},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [30, 20, 15, 6]},  # past the right edge
            {"id": 3, "image_id": 12, "category_id": 7, "bbox": [0, 0, 20, 50], "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    data.update(changes)
    return data


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    _png(tmp_path / "a.png", 40, 30)
    _png(tmp_path / "b.png", 20, 50)
    (tmp_path / "train.json").write_text(json.dumps(_coco()))
    return tmp_path


def test_coco_is_read_with_contiguous_classes_both_ways_and_boxes_clipped(coco_dir: Path) -> None:
    dataset = read_coco(coco_dir / "train.json")
    assert dataset.class_names == ("cat", "dog")
    assert dataset.category_ids == (3, 7)
    first, second = dataset.images
    assert (first.image_id, first.file, first.width, first.height) == (11, coco_dir / "a.png", 40, 30)
    np.testing.assert_array_equal(first.boxes, [[2, 3, 12, 8], [30, 20, 40, 26]])
    np.testing.assert_array_equal(first.labels, [1, 0])
    np.testing.assert_array_equal(second.crowd, [True])
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64
    assert dataset.clipped_boxes == 1
    assert "1 boxes clipped" in dataset.summary()


def test_the_description_is_immutable(coco_dir: Path) -> None:
    image = read_coco(coco_dir / "train.json").images[0]
    with pytest.raises(ValueError, match="read-only"):
        image.boxes[0, 0] = 5.0
    with pytest.raises(AttributeError):
        image.width = 3  # type: ignore[misc]


def test_images_without_boxes_are_kept(coco_dir: Path) -> None:
    (coco_dir / "train.json").write_text(json.dumps(_coco(annotations=[])))
    dataset = read_coco(coco_dir / "train.json")
    assert [len(image.labels) for image in dataset.images] == [0, 0]
    assert dataset.images[0].boxes.shape == (0, 4)


def test_written_coco_reads_back_the_same(coco_dir: Path, tmp_path: Path) -> None:
    dataset = read_coco(coco_dir / "train.json")
    write_coco(dataset, coco_dir / "copy.json")
    again = read_coco(coco_dir / "copy.json")
    assert again.clipped_boxes == 0  # the clipped box was written clipped
    assert (again.class_names, again.category_ids) == (dataset.class_names, dataset.category_ids)
    for before, after in zip(dataset.images, again.images, strict=True):
        assert (before.image_id, before.file, before.width, before.height) == (
            after.image_id,
            after.file,
            after.width,
            after.height,
        )
        np.testing.assert_allclose(after.boxes, before.boxes, atol=1e-5)
        np.testing.assert_array_equal(after.labels, before.labels)
        np.testing.assert_array_equal(after.crowd, before.crowd)
    assert [p.name for p in coco_dir.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_write_coco_refuses_an_image_outside_the_folder(coco_dir: Path, tmp_path: Path) -> None:
    dataset = read_coco(coco_dir / "train.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(UsageError, match="is not inside the image folder"):
        write_coco(dataset, elsewhere / "out.json")
    assert not (elsewhere / "out.json").exists()


def _yolo_tree(root: Path, split: str = "train") -> Path:
    images = root / "images" / split
    _png(images / "one.png", 40, 20)
    _png(images / "two.jpg", 30, 30)
    labels = root / "labels" / split
    labels.mkdir(parents=True)
    # cx cy w h normalised: a 10x4 box at (15, 8) and a box reaching past the bottom edge.
    (labels / "one.txt").write_text("1 0.375 0.4 0.25 0.2\n0 0.5 0.9 0.5 0.4\n")
    (root / "data.yaml").write_text("path: .\nnames:\n  0: cat\n  1: dog\n")
    return images


def test_yolo_is_read_from_images_and_labels_side_by_side(tmp_path: Path) -> None:
    dataset = read_yolo(_yolo_tree(tmp_path))
    assert dataset.class_names == ("cat", "dog") and dataset.category_ids == (0, 1)
    one, two = dataset.images
    assert (one.image_id, one.width, one.height) == (1, 40, 20)
    np.testing.assert_allclose(one.boxes, [[10, 6, 20, 10], [10, 14, 30, 20]], atol=1e-5)
    np.testing.assert_array_equal(one.labels, [1, 0])
    assert len(two.labels) == 0  # no label file: a negative
    assert dataset.clipped_boxes == 1


def test_yolo_class_names_from_classes_txt_and_a_names_list(tmp_path: Path) -> None:
    images = _yolo_tree(tmp_path)
    (tmp_path / "data.yaml").unlink()
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert read_yolo(images).class_names == ("cat", "dog")
    (tmp_path / "classes.txt").unlink()
    (tmp_path / "labels" / "train" / "classes.txt").write_text("cat\ndog\n")  # where LabelImg writes it
    assert read_yolo(images).class_names == ("cat", "dog")
    (tmp_path / "names.yaml").write_text("names: [a, b, c]\n")
    assert read_yolo(images, tmp_path / "names.yaml").class_names == ("a", "b", "c")


# --- bad input: one line naming the file and what was expected ---------------------------------------


@dataclass(frozen=True)
class Bad:
    name: str
    damage: Callable[[Path], Path]  # makes the input bad, returns the file the error must name
    fragment: str


def _json(data: Any) -> Callable[[Path], Path]:
    def damage(root: Path) -> Path:
        (root / "train.json").write_text(json.dumps(data))
        return root / "train.json"

    return damage


def _text(text: str) -> Callable[[Path], Path]:
    def damage(root: Path) -> Path:
        (root / "train.json").write_text(text)
        return root / "train.json"

    return damage


def _annotation(**fields: Any) -> dict[str, Any]:
    entry = {"id": 1, "image_id": 11, "category_id": 7, "bbox": [2, 3, 10, 5]}
    entry.update(fields)
    return _coco(annotations=[entry])


def _missing_image(root: Path) -> Path:
    (root / "b.png").unlink()
    return root / "b.png"


COCO_ROWS = [
    Bad("empty file", _text(""), "is empty; expected COCO-format JSON"),
    Bad("not json", _text("{images: "), "is not valid JSON"),
    Bad("a list", _json([]), "expected a COCO-format JSON object"),
    Bad("no images key", _json({"annotations": [], "categories": []}), "'images' is missing"),
    Bad("no images", _json(_coco(images=[])), "'images' is empty"),
    Bad("no categories", _json(_coco(categories=[])), "'categories' is empty"),
    Bad(
        "image without width",
        _json(_coco(images=[{"id": 1, "file_name": "a.png", "height": 3}])),
        "'width' is None; expected a positive integer",
    ),
    Bad(
        "duplicate image id",
        _json(
            _coco(
                images=[
                    {"id": 11, "file_name": "a.png", "width": 40, "height": 30},
                    {"id": 11, "file_name": "b.png", "width": 20, "height": 50},
                ]
            )
        ),
        "image id 11 is repeated",
    ),
    Bad(
        "duplicate category id",
        _json(_coco(categories=[{"id": 7, "name": "a"}, {"id": 7, "name": "b"}])),
        "category id 7 is repeated",
    ),
    Bad(
        "unknown category",
        _json(_annotation(category_id=5)),
        "category_id 5 is not in 'categories' (ids [3, 7])",
    ),
    Bad("unknown image", _json(_annotation(image_id=99)), "image_id 99 is not in 'images'"),
    Bad("bbox of three", _json(_annotation(bbox=[1, 2, 3])), "expected [x, y, width, height]"),
    Bad("bbox of strings", _json(_annotation(bbox=["1", 2, 3, 4])), "expected [x, y, width, height]"),
    Bad("zero width", _json(_annotation(bbox=[2, 3, 0, 5])), "has zero or negative width or height"),
    Bad("negative height", _json(_annotation(bbox=[2, 3, 4, -1])), "has zero or negative width or height"),
    Bad("wholly outside", _json(_annotation(bbox=[50, 3, 4, 4])), "lies wholly outside the 40x30 image"),
    Bad("missing image", _missing_image, "not found"),
]


@pytest.mark.parametrize("row", COCO_ROWS, ids=[row.name for row in COCO_ROWS])
def test_bad_coco(row: Bad, coco_dir: Path) -> None:
    named = row.damage(coco_dir)
    with pytest.raises(UsageError) as caught:
        read_coco(coco_dir / "train.json")
    message = str(caught.value)
    assert row.fragment in message and str(named) in message
    assert "\n" not in message


def _yolo_line(line: str) -> Callable[[Path], Path]:
    def damage(root: Path) -> Path:
        label = root / "labels" / "train" / "one.txt"
        label.write_text(line + "\n")
        return label

    return damage


def _orphan_label(root: Path) -> Path:
    label = root / "labels" / "train" / "three.txt"
    label.write_text("0 0.5 0.5 0.1 0.1\n")
    return label


def _no_class_names(root: Path) -> Path:
    (root / "data.yaml").unlink()
    return root / "classes.txt"


def _names_not_a_list(root: Path) -> Path:
    (root / "data.yaml").write_text("names: cat\n")
    return root / "data.yaml"


def _no_labels_folder(root: Path) -> Path:
    for label in (root / "labels" / "train").iterdir():
        label.unlink()
    (root / "labels" / "train").rmdir()
    return root / "labels" / "train"


YOLO_ROWS = [
    Bad("four fields", _yolo_line("0 0.5 0.5 0.1"), "4 fields; expected 5 (class cx cy w h"),
    Bad("segment polygon", _yolo_line("0 0.1 0.1 0.2 0.1 0.2 0.2"), "7 fields; expected 5"),
    Bad("not a number", _yolo_line("0 0.5 x 0.1 0.1"), "holds a non-number"),
    Bad("class out of range", _yolo_line("2 0.5 0.5 0.1 0.1"), "class 2 is not a class index 0..1"),
    Bad("fractional class", _yolo_line("0.5 0.5 0.5 0.1 0.1"), "class 0.5 is not a class index"),
    Bad("zero size", _yolo_line("0 0.5 0.5 0 0.1"), "has zero or negative width or height"),
    Bad("nan", _yolo_line("0 nan 0.5 0.1 0.1"), "non-finite"),
    Bad("label without image", _orphan_label, "has no image"),
    Bad("no class names", _no_class_names, "has no class names"),
    Bad("names not a list", _names_not_a_list, "expected a non-empty list of names"),
    Bad("no labels folder", _no_labels_folder, "not found"),
]


@pytest.mark.parametrize("row", YOLO_ROWS, ids=[row.name for row in YOLO_ROWS])
def test_bad_yolo(row: Bad, tmp_path: Path) -> None:
    images = _yolo_tree(tmp_path)
    named = row.damage(tmp_path)
    with pytest.raises(UsageError) as caught:
        read_yolo(images)
    message = str(caught.value)
    assert row.fragment in message and str(named) in message
    assert "\n" not in message


def test_yolo_needs_an_images_part_in_its_path(tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    _png(folder / "x.png", 4, 4)
    with pytest.raises(UsageError, match="has no 'images' part"):
        read_yolo(folder)


def test_dataset_counts(coco_dir: Path) -> None:
    dataset: DetectionDataset = read_coco(coco_dir / "train.json")
    assert (dataset.num_classes, dataset.num_boxes) == (2, 3)
