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
# PIL's modes of one channel wider than 8 bits: 16-bit unsigned ("I;16*"), 32-bit signed ("I"),
# 32-bit float ("F"). PIL's own convert() clips the integers at 255 and maps float 0-1 to 0-1 of
# 255, so a 16-bit or float image would reach the model saturated or black.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UINT16_MAX = 65535


def to_8bit(image: Image.Image) -> Image.Image:
    """Return a one-channel image of more than 8 bits as 8-bit "L", rescaled by its bit depth.

    16-bit integers (and 32-bit "I" images holding them, as some readers give 16-bit PNG and
    TIFF files) are scaled by 255/65535; floats must lie in 0-1 and are scaled by 255. Values a
    bit depth cannot explain (negative, above 65535, float outside 0-1, NaN) are a ValueError:
    there is no right way to guess what they mean. Other images are returned unchanged; PIL
    already reads 16-bit RGB files as 8-bit RGB, scaled.
    """
    if image.mode not in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if values.size == 0:
        raise ValueError("the image has no pixels")
    low, high = float(values.min()), float(values.max())
    if image.mode == "F":
        if not (np.isfinite(values).all() and low >= 0.0 and high <= 1.0):
            raise ValueError(
                f"floating-point pixels span {low:g} to {high:g}; expected values in 0-1"
                " (or save the image as 8- or 16-bit)"
            )
        scale = 255.0
    else:
        if low < 0 or high > _UINT16_MAX:
            raise ValueError(
                f"32-bit integer pixels span {low:g} to {high:g}; expected 8- or 16-bit values (0-65535)"
            )
        scale = 255.0 / _UINT16_MAX
    return Image.fromarray(np.rint(values * scale).astype(np.uint8), "L")


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) once the shorter side is `size`, the longer one rounded down as torchvision does."""
    return (size, int(size * height / width)) if width <= height else (int(size * width / height), size)


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size`, rounding the longer one down as torchvision does.

    ValueError when the result would hold more pixels than PIL decodes safely: a long, thin image
    (1 x 50000 pixels, resized to 256 on its short side) would otherwise expand to billions.
    """
    width, height = image.size
    new_size = shorter_side_size(width, height, size)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and new_size[0] * new_size[1] > limit:
        raise ValueError(
            f"{width} x {height} pixels would become {new_size[0]} x {new_size[1]} when resized to"
            f" {size} on the shorter side, more than the {limit} pixels an image may hold"
        )
    return image.resize(new_size, Image.Resampling.BILINEAR)


def center_crop_offset(size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """(left, top) of the centre `height` x `width` crop of an image of `size` (width, height),
    rounded as torchvision's CenterCrop does."""
    img_width, img_height = size
    return round((img_width - width) / 2.0), round((img_height - height) / 2.0)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Crop the centre `height` x `width` (see `center_crop_offset`)."""
    left, top = center_crop_offset(image.size, height, width)
    return image.crop((left, top, left + width, top + height))


def to_original_pixels(boxes: np.ndarray, size: tuple[int, int], spec: InputSpec) -> np.ndarray:
    """Boxes (n, 4) x1, y1, x2, y2 in the model's input pixels, mapped back onto the original image
    of `size` (width, height) by undoing `preprocess_image`'s resize and centre crop; clipped to the
    image, since a box may reach into what the crop cut off or past the input's edge. float32."""
    _, height, width = spec.shape
    if spec.resize is None:
        scaled_width, scaled_height, left, top = width, height, 0, 0
    else:
        scaled_width, scaled_height = shorter_side_size(size[0], size[1], spec.resize)
        left, top = center_crop_offset((scaled_width, scaled_height), height, width)
    shift = np.array([left, top, left, top], dtype=np.float64)
    scale = np.array([scaled_width / size[0], scaled_height / size[1]] * 2, dtype=np.float64)
    original = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) + shift) / scale
    original[:, 0::2] = original[:, 0::2].clip(0, size[0])
    original[:, 1::2] = original[:, 1::2].clip(0, size[1])
    return original.astype(np.float32)


def preprocess_image(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Return one image as a normalised float32 (C, H, W) array."""
    channels, height, width = spec.shape
    # Grayscale, palette, RGBA and CMYK images all become the model's channel count.
    image = to_8bit(image).convert(_MODES[channels])
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
    return load_image_sized(path, spec)[0]


def load_image_sized(path: str | os.PathLike[str], spec: InputSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """As `load_image`, with the file's own size (width, height), which `to_original_pixels` needs."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file}: no such image file")
    try:
        with Image.open(file) as image:
            return preprocess_image(image, spec), image.size
    except Image.DecompressionBombError as exc:
        raise UsageError(f"{file}: refused, too many pixels to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UsageError(f"{file}: cannot read as an image ({exc})") from exc


def load_images(paths: Sequence[str | os.PathLike[str]], spec: InputSpec) -> np.ndarray:
    """Read image files into one float32 (N, C, H, W) batch."""
    if not paths:
        raise UsageError("no image files given")
    return np.stack([load_image(p, spec) for p in paths])
