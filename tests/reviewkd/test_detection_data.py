"""The detection Dataset, its collate function, and augmentation that moves boxes, checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deploy.detection.annotations import read_coco
from deploy.errors import UsageError
from reviewkd.detection.data import BoxAugment, DetectionImages, collate_detection, hflip, scale_crop


def test_a_flip_mirrors_the_boxes_and_twice_is_the_identity() -> None:
    image = torch.rand(3, 6, 10)
    boxes = torch.tensor([[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 10.0, 6.0]])
    flipped_image, flipped = hflip(image, boxes)
    assert torch.equal(flipped, torch.tensor([[6.0, 2.0, 9.0, 5.0], [0.0, 0.0, 10.0, 6.0]]))
    assert torch.equal(flipped_image[:, :, 0], image[:, :, -1])
    again_image, again = hflip(flipped_image, flipped)
    assert torch.equal(again_image, image) and torch.equal(again, boxes)


def test_a_crop_moves_clips_and_drops_boxes() -> None:
    image = torch.rand(3, 20, 40)  # non-square: H 20, W 40
    boxes = torch.tensor(
        [
            [10.0, 4.0, 20.0, 8.0],  # scaled x2 to [20, 8, 40, 16], moved by (10, 4): inside
            [15.0, 5.0, 25.0, 15.0],  # [30, 10, 50, 30] -> [20, 6, 40, 26]: clipped at the bottom
            [0.0, 0.0, 4.0, 4.0],  # [0, 0, 8, 8] -> [-10, -4, -2, 4]: left of the window, dropped
        ]
    )
    cropped, moved, kept = scale_crop(image, boxes, scale=2.0, top=4, left=10)
    assert torch.equal(kept, torch.tensor([0, 1]))
    assert torch.equal(moved, torch.tensor([[10.0, 4.0, 30.0, 12.0], [20.0, 6.0, 40.0, 20.0]]))
    resized = F.interpolate(image[None], size=(40, 80), mode="bilinear", align_corners=False)[0]
    assert cropped.shape == image.shape
    assert torch.equal(cropped, resized[:, 4:24, 10:50])


def test_a_scale_below_one_pads_around_the_image() -> None:
    image = torch.rand(3, 20, 40)
    boxes = torch.tensor([[10.0, 4.0, 20.0, 8.0]])
    padded, moved, kept = scale_crop(image, boxes, scale=0.5, top=-5, left=-10)
    assert torch.equal(moved, torch.tensor([[15.0, 7.0, 20.0, 9.0]])) and kept.tolist() == [0]
    resized = F.interpolate(image[None], size=(10, 20), mode="bilinear", align_corners=False)[0]
    assert torch.equal(padded[:, 5:15, 10:30], resized)
    padded[:, 5:15, 10:30] = 0
    assert float(padded.abs().sum()) == 0.0


def _tree(root: Path) -> Path:
    """Two non-square images (3 boxes, one of them crowd) and a negative one, as COCO JSON."""
    rng = np.random.default_rng(0)
    for name, (height, width) in {"a.png": (24, 40), "b.png": (30, 20), "c.png": (16, 16)}.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / name)
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 24},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 30},
            {"id": 3, "file_name": "c.png", "width": 16, "height": 16},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 2, 10, 8]},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [20, 10, 12, 10]},
            {"id": 3, "image_id": 2, "category_id": 9, "bbox": [0, 0, 20, 30], "iscrowd": 1},
        ],
        "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}],
    }
    (root / "train.json").write_text(json.dumps(data))
    return root / "train.json"


def test_samples_are_what_torchvision_detectors_take(tmp_path: Path) -> None:
    dataset = DetectionImages(read_coco(_tree(tmp_path)))
    image, target = dataset[0]
    assert (
        image.shape == (3, 24, 40) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    )
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 2.0, 12.0, 10.0], [20.0, 10.0, 32.0, 20.0]]))
    assert target["labels"].tolist() == [0, 1] and int(target["image_id"]) == 1
    _, crowd_only = dataset[1]
    assert crowd_only["boxes"].shape == (0, 4) and crowd_only["labels"].shape == (0,)
    images, targets = collate_detection([dataset[0], dataset[1], dataset[2]])
    assert [tuple(i.shape) for i in images] == [(3, 24, 40), (3, 30, 20), (3, 16, 16)]
    assert [int(t["image_id"]) for t in targets] == [1, 2, 3]


def test_augmentation_is_seeded_per_sample_and_epoch(tmp_path: Path) -> None:
    annotations = read_coco(_tree(tmp_path))
    augment = BoxAugment(flip_probability=0.5, min_scale=0.6, max_scale=1.6)
    first, second = (
        DetectionImages(annotations, augment, seed=3),
        DetectionImages(annotations, augment, seed=3),
    )
    samples = [first[0] for _ in range(2)] + [second[0]]
    for image, target in samples[1:]:
        assert torch.equal(image, samples[0][0]) and torch.equal(target["boxes"], samples[0][1]["boxes"])
    draws = set()
    for epoch in range(6):
        first.set_epoch(epoch)
        image, target = first[0]
        assert image.shape == (3, 24, 40)
        boxes = target["boxes"]
        draws.add(tuple(boxes.flatten().tolist()))
        assert len(boxes) == len(target["labels"])
        assert bool((boxes[:, 2] - boxes[:, 0] >= 1).all()) and bool((boxes[:, 3] - boxes[:, 1] >= 1).all())
        assert bool((boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 40).all())
        assert bool((boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 24).all())
    assert len(draws) > 1  # epochs draw differently


def test_an_image_of_another_size_than_annotated_is_one_line(tmp_path: Path) -> None:
    annotations = read_coco(_tree(tmp_path))
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(UsageError, match=r"a\.png is 10x10; its annotations say 40x24"):
        DetectionImages(annotations)[0]


def test_a_bad_scale_range_is_one_line() -> None:
    with pytest.raises(UsageError, match="expected 0 < min <= max"):
        BoxAugment(min_scale=1.5, max_scale=1.0)
