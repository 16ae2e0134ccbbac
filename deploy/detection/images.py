"""A detection data set's images as the exported files take them: float32 [B, 3, H, W] RGB in 0-1.

The files take images at the size their detector was exported for and return boxes in those
pixels, which are then the ground truth's pixels: an image of another size is refused (a UsageError
naming it), not resized, so no box is ever scored in the wrong frame. PIL and numpy only (the edge
install validates with it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from deploy.detection.annotations import ImageAnnotation
from deploy.errors import UsageError


def read_image(record: ImageAnnotation, size: tuple[int, int]) -> np.ndarray:
    """One image as float32 (3, H, W) in 0-1; UsageError when unreadable or not of `size` (H, W)."""
    try:
        with Image.open(record.file) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"image file {record.file} cannot be read as an image ({exc})") from exc
    if pixels.shape[:2] != size:
        raise UsageError(
            f"image file {record.file}: {pixels.shape[1]}x{pixels.shape[0]} pixels; the exported detector"
            f" takes {size[1]}x{size[0]} (W x H) images"
        )
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def image_batches(
    records: Sequence[ImageAnnotation], size: tuple[int, int], batch_size: int
) -> Iterator[np.ndarray]:
    """The images of `records`, in order, in batches of `batch_size`."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(records), batch_size):
        yield np.stack([read_image(record, size) for record in records[start : start + batch_size]])
