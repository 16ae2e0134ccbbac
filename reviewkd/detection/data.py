"""A torch Dataset over a DetectionDataset, its collate function, and augmentation that moves the boxes.

Samples are what torchvision's detectors take: an RGB float image (3, H, W) in 0-1 (the detectors
normalise it themselves) and a target dict(boxes=float32 (N, 4) x1, y1, x2, y2 pixels,
labels=int64 (N,) class indices 0..K-1, image_id=int64 scalar). Class indices stay contiguous from
0 here; the shift some detectors need for their background class happens in one place, the model
wrapper of reviewkd.detection.models. Crowd regions are left out of training targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from deploy.detection.annotations import DetectionDataset
from deploy.errors import UsageError

Target = dict[str, torch.Tensor]


def read_rgb(path: object) -> torch.Tensor:
    """An image file as a float32 (3, H, W) RGB tensor in 0-1; UsageError naming an unreadable file."""
    try:
        with Image.open(str(path)) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"image file {path} cannot be read as an image ({exc})") from exc
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror an image (C, H, W) left to right, and its boxes (N, 4) x1, y1, x2, y2 with it."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped


def scale_crop(
    image: torch.Tensor,
    boxes: torch.Tensor,
    scale: float,
    top: int,
    left: int,
    min_box_side: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize an image by `scale`, then take the window of its original size whose top-left corner is
    (`top`, `left`) in the resized image; window parts outside the resized image are zeros.

    Boxes scale with the image, move with the window and are clipped to it; a box whose clipped
    width or height is below `min_box_side` pixels (one that left the window) is dropped.
    Returns (image, boxes, indices of the boxes kept).
    """
    height, width = image.shape[-2:]
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(image[None], size=(new_height, new_width), mode="bilinear", align_corners=False)[
        0
    ]
    window = image.new_zeros(image.shape)
    # The overlap of the window [top, top + height) x [left, left + width) with the resized image.
    source_top, source_left = max(top, 0), max(left, 0)
    source_bottom, source_right = min(top + height, new_height), min(left + width, new_width)
    if source_bottom > source_top and source_right > source_left:
        window[:, source_top - top : source_bottom - top, source_left - left : source_right - left] = resized[
            :, source_top:source_bottom, source_left:source_right
        ]
    factors = boxes.new_tensor([new_width / width, new_height / height] * 2)
    moved = boxes * factors - boxes.new_tensor([left, top, left, top])
    moved[:, 0::2] = moved[:, 0::2].clamp(0, width)
    moved[:, 1::2] = moved[:, 1::2].clamp(0, height)
    keep = ((moved[:, 2] - moved[:, 0]) >= min_box_side) & ((moved[:, 3] - moved[:, 1]) >= min_box_side)
    indices = torch.nonzero(keep).flatten()
    return window, moved[indices], indices


@dataclass(frozen=True)
class BoxAugment:
    """Random horizontal flip and scale/crop (see `scale_crop`), drawn from a seeded generator.

    Args:
        flip_probability: chance of a horizontal flip.
        min_scale, max_scale: the resize factor is uniform in this range; the window keeps the
            image's size, so a factor below 1 pads and one above 1 crops.
        min_box_side: boxes narrower or shorter than this after the crop are dropped.
    """

    flip_probability: float = 0.5
    min_scale: float = 0.75
    max_scale: float = 1.25
    min_box_side: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_probability <= 1.0:
            raise UsageError(f"augmentation: flip_probability {self.flip_probability} is not in 0..1")
        if not 0.0 < self.min_scale <= self.max_scale:
            raise UsageError(
                f"augmentation: scale range {self.min_scale}..{self.max_scale}; expected 0 < min <= max"
            )

    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if rng.random() < self.flip_probability:
            image, boxes = hflip(image, boxes)
        scale = float(rng.uniform(self.min_scale, self.max_scale))
        height, width = image.shape[-2:]
        spare_height, spare_width = round(height * scale) - height, round(width * scale) - width
        # The window starts anywhere that keeps it over the resized image (or the image inside it).
        top = int(rng.integers(min(spare_height, 0), max(spare_height, 0) + 1))
        left = int(rng.integers(min(spare_width, 0), max(spare_width, 0) + 1))
        image, boxes, kept = scale_crop(image, boxes, scale, top, left, self.min_box_side)
        return image, boxes, labels[kept]


class DetectionImages(Dataset[tuple[torch.Tensor, Target]]):
    """The images of a DetectionDataset as detector samples (see the module docstring).

    With `augment`, sample i of epoch e is augmented by a generator seeded with (seed, e, i), so a
    run is reproducible whatever the order or the worker that loads it; call `set_epoch` each epoch.
    """

    def __init__(
        self, annotations: DetectionDataset, augment: BoxAugment | None = None, seed: int = 0
    ) -> None:
        self.annotations = annotations
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.annotations.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self.annotations.images[index]
        image = read_rgb(record.file)
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise UsageError(
                f"image file {record.file} is {image.shape[-1]}x{image.shape[-2]}; its annotations say"
                f" {record.width}x{record.height} ({self.annotations.source})"
            )
        solid = ~record.crowd
        boxes = torch.from_numpy(record.boxes[solid].copy())
        labels = torch.from_numpy(record.labels[solid].copy())
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, boxes, labels = self.augment(image, boxes, labels, rng)
        return image, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(record.image_id)}


def collate_detection(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Lists of images and targets, as torchvision's detectors take them (images may differ in size)."""
    return [image for image, _ in batch], [target for _, target in batch]
