"""Image files -> the float32 (N, C, H, W) batch a run's model expects, from the manifest alone.

Mirrors the evaluation transforms used in training (torchvision's Resize(shorter side) +
CenterCrop, or Resize((H, W)); ToTensor; Normalize) with PIL and numpy only, so a serving
device needs neither torch nor torchvision.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from deploy.errors import UsageError
from deploy.manifest import InputSpec

# PIL modes for the channel counts a classifier takes (deploy.manifest.IMAGE_CHANNELS).
_MODES = {1: "L", 3: "RGB"}


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size`, rounding the longer one down as torchvision does."""
    width, height = image.size
    new_size = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    return image.resize(new_size, Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Crop the centre `height` x `width`, offsets rounded as torchvision's CenterCrop does."""
    img_width, img_height = image.size
    top = round((img_height - height) / 2.0)
    left = round((img_width - width) / 2.0)
    return image.crop((left, top, left + width, top + height))


def preprocess_image(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Return one image as a normalised float32 (C, H, W) array."""
    channels, height, width = spec.shape
    # Grayscale, palette, RGBA and CMYK images all become the model's channel count.
    image = image.convert(_MODES[channels])
    if spec.resize is None:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    else:
        image = _center_crop(_resize_shorter_side(image, spec.resize), height, width)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def load_image(path: str | os.PathLike[str], spec: InputSpec) -> np.ndarray:
    """Read an image file and preprocess it; a missing or unreadable file is a UsageError naming it."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file}: no such image file")
    try:
        with Image.open(file) as image:
            return preprocess_image(image, spec)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"{file}: cannot read as an image ({exc})") from exc


def load_images(paths: Sequence[str | os.PathLike[str]], spec: InputSpec) -> np.ndarray:
    """Read image files into one float32 (N, C, H, W) batch."""
    if not paths:
        raise UsageError("no image files given")
    return np.stack([load_image(p, spec) for p in paths])
