"""The embedded digits detection set: written to disk once, deterministic, read by the real COCO reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.detection.annotations import read_coco
from deploy.errors import OutputError, UsageError
from reviewkd.detection import synthetic
from reviewkd.detection.synthetic import (
    CATEGORY_IDS,
    INDEX_NAME,
    DigitsDetectionSpec,
    ensure_digits_detection,
)

TINY = DigitsDetectionSpec(seed=1, train_images=6, val_images=3)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "set"
    ensure_digits_detection(root, TINY)
    return root


def _index(root: Path) -> dict[str, str]:
    return json.loads((root / INDEX_NAME).read_text())["files"]


def test_each_split_reads_as_coco_with_digits_on_non_square_canvases(tree: Path) -> None:
    for split, count in (("train", TINY.train_images), ("val", TINY.val_images)):
        dataset = read_coco(tree / split / "annotations.json")
        assert len(dataset.images) == count and dataset.clipped_boxes == 0
        assert dataset.class_names == tuple("0123456789") and dataset.category_ids == CATEGORY_IDS
        for image in dataset.images:
            assert (image.width, image.height) == (TINY.width, TINY.height) != (TINY.height, TINY.width)
            assert Image.open(image.file).size == (TINY.width, TINY.height)
            assert 1 <= len(image.labels) <= TINY.max_digits
            sides = image.boxes[:, 2:] - image.boxes[:, :2]
            assert (sides >= 1).all() and (sides <= TINY.max_size).all()
            brightest = np.asarray(Image.open(image.file)).max(axis=2)
            for x1, y1, x2, y2 in image.boxes.astype(int):
                # the digit's ink (at least 60% bright) is inside its box; the background is darker
                assert brightest[y1:y2, x1:x2].max() >= 0.55 * 255


def test_the_same_spec_gives_the_same_bytes_and_another_seed_does_not(tree: Path, tmp_path: Path) -> None:
    ensure_digits_detection(tmp_path / "again", TINY)
    assert _index(tmp_path / "again") == _index(tree)
    other = DigitsDetectionSpec(seed=2, train_images=6, val_images=3)
    ensure_digits_detection(tmp_path / "other", other)
    assert _index(tmp_path / "other") != _index(tree)


def test_a_complete_tree_is_not_written_again(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise AssertionError("the complete tree was written again")

    monkeypatch.setattr(synthetic, "_write_split", refuse)
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*")}
    paths = ensure_digits_detection(tree, TINY)
    assert paths == {"train": tree / "train" / "annotations.json", "val": tree / "val" / "annotations.json"}
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*")} == before


def test_a_damaged_or_other_spec_tree_is_written_again_whole(tree: Path, tmp_path: Path) -> None:
    import shutil

    root = Path(shutil.copytree(tree, tmp_path / "copy"))
    damaged = root / "train" / "images" / "000002.png"
    damaged.write_bytes(b"not a png")
    (root / "val" / "images" / "000000.png").unlink()
    ensure_digits_detection(root, TINY)
    assert _index(root) == _index(tree)
    assert damaged.read_bytes() == (tree / "train" / "images" / "000002.png").read_bytes()
    bigger = DigitsDetectionSpec(seed=1, train_images=7, val_images=3)
    ensure_digits_detection(root, bigger)
    assert len(read_coco(root / "train" / "annotations.json").images) == 7
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no staging folder left


def test_a_folder_it_did_not_write_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="expected a missing or empty folder, or one this generator wrote"):
        ensure_digits_detection(tmp_path, TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_an_impossible_spec_is_one_line() -> None:
    with pytest.raises(UsageError, match="max_size <= 64"):
        DigitsDetectionSpec(max_size=80)


def test_an_unwritable_place_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder belongs")
    with pytest.raises(OutputError, match=f"{blocker / 'set'}: cannot write it"):
        ensure_digits_detection(blocker / "set", TINY)
    assert blocker.read_text() == "a file where a folder belongs"
