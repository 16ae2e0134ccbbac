"""Detect objects in image files with a run's detection file: boxes in each original image's pixels,
as JSON, as a table, and drawn onto copies of the images.

The file returns boxes in its input's pixels (deploy.detection.outputs); `to_original_pixels` undoes
the resize and crop the manifest's input block made, so a box lands where the object is in the file
the user gave. Drawing needs Pillow alone (a core dependency): no matplotlib, no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deploy.detection.outputs import decode_outputs
from deploy.errors import UsageError, printable
from deploy.fileio import atomic_output
from deploy.predict import DEFAULT_BATCH, checked_input, pad_to_min_batch
from deploy.preprocess import load_image_sized, to_8bit, to_original_pixels
from deploy.runners.base import Runner

# Outline colours, one per class index (cycled): distinct on light and dark images alike.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
)
# Suffix of a drawn image: PNG whatever the input was, so the drawing is never recompressed lossily.
DRAWN_SUFFIX = ".png"


@dataclass(frozen=True)
class FoundObject:
    """One detection: its class index and name, its score, and its box x1, y1, x2, y2 in the
    original image's pixels."""

    class_index: int
    class_name: str
    score: float
    box: tuple[float, float, float, float]

    def as_json(self) -> dict[str, Any]:
        return {"class": self.class_name, "score": self.score, "box": list(self.box)}


@dataclass(frozen=True)
class ImageDetections:
    """An image's size (width, height) as read, and what was found in it, best score first."""

    size: tuple[int, int]
    objects: tuple[FoundObject, ...]

    def as_json(self) -> dict[str, Any]:
        return {"size": list(self.size), "detections": [found.as_json() for found in self.objects]}


def _class_names(manifest: Mapping[str, Any]) -> list[str]:
    names = [str(name) for name in manifest.get("classes") or []]
    if not names:
        raise UsageError("manifest: a detection run lists its class names (classes); this one lists none")
    return names


def detect_each(
    runner: Runner, manifest: Mapping[str, Any], image_paths: Sequence[str | os.PathLike[str]]
) -> list[ImageDetections | UsageError]:
    """Detect objects in each image, in order; an image that cannot be read takes its UsageError as
    its result and the others are still run.

    Images are preprocessed as the manifest's input block says; boxes come back in each image's own
    pixels. A file whose outputs break the detection contract (names, types, counts, class indices
    past the manifest's classes) is a UsageError naming the file.
    """
    spec = checked_input(runner, manifest, image_paths)
    names = _class_names(manifest)
    results: list[ImageDetections | UsageError] = []
    pixels: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    for path in image_paths:
        try:
            image, size = load_image_sized(path, spec)
        except UsageError as exc:
            results.append(exc)
            continue
        pixels.append(image)
        sizes.append(size)
        results.append(ImageDetections(size, ()))  # filled in below, in order
    if not pixels:
        return results
    images = np.stack(pixels)
    chunk = runner.max_batch or DEFAULT_BATCH
    # The file an error names: an ONNX runner's path; otherwise the runner's format key.
    source = getattr(runner, "path", runner.name)
    found = []
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk]
        padded, count = pad_to_min_batch(runner, batch)
        found.extend(decode_outputs(runner.infer_outputs(padded), str(source), len(names))[:count])
    detected = iter(
        ImageDetections(
            size,
            tuple(
                FoundObject(int(index), names[int(index)], float(score), _box(box))
                for box, score, index in zip(
                    to_original_pixels(one.boxes, size, spec), one.scores, one.classes, strict=True
                )
            ),
        )
        for one, size in zip(found, sizes, strict=True)
    )
    return [result if isinstance(result, UsageError) else next(detected) for result in results]


def _box(values: np.ndarray) -> tuple[float, float, float, float]:
    # Two decimals: a hundredth of a pixel is below what any detector resolves.
    x1, y1, x2, y2 = (round(float(v), 2) for v in values)
    return x1, y1, x2, y2


def detections_table(paths: Sequence[Path], results: Sequence[ImageDetections | UsageError]) -> str:
    """One row per detection (an image without any gets one row saying so), names escaped
    (deploy.errors.printable) so a file or class name cannot forge a row."""
    rows = [("IMAGE", "#", "CLASS", "SCORE", "BOX x1,y1,x2,y2")]
    for path, result in zip(paths, results, strict=True):
        shown = printable(str(path))
        if isinstance(result, UsageError):
            rows.append((shown, "-", printable(f"error: {result}"), "", ""))
            continue
        if not result.objects:
            rows.append((shown, "-", "(nothing detected)", "", ""))
        for rank, found in enumerate(result.objects, start=1):
            box = ",".join(f"{v:.1f}" for v in found.box)
            name = printable(found.class_name)
            rows.append((shown if rank == 1 else "", str(rank), name, f"{found.score:.4f}", box))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip()
        for r in rows
    )


def drawn_paths(image_paths: Sequence[Path], save_dir: Path) -> list[Path]:
    """Where each image's drawing goes: save_dir/<file stem>.png. UsageError, before anything is
    drawn, when two images would be written to the same file (same stem, other folders or suffixes)."""
    targets: dict[Path, Path] = {}
    for path in image_paths:
        target = save_dir / f"{Path(path).stem}{DRAWN_SUFFIX}"
        if target in targets:
            raise UsageError(
                f"--save-dir {save_dir}: {targets[target]} and {path} would both be drawn to {target.name};"
                " give images of different names"
            )
        targets[target] = Path(path)
    return list(targets)


# The shorter side, in pixels, below which a drawn image is enlarged (see draw_detections).
MIN_DRAWN_SIDE = 256


def drawing_scale(size: tuple[int, int]) -> int:
    """The whole factor an image of `size` (width, height) is enlarged by to be drawn on: the
    smallest that makes its shorter side at least MIN_DRAWN_SIDE, and 1 for larger images."""
    return max(1, -(-MIN_DRAWN_SIDE // max(1, min(size))))


def draw_detections(image_path: str | os.PathLike[str], found: ImageDetections, target: Path) -> Path:
    """Write the image at `image_path` with each box outlined in its class's colour and labelled
    "class score" above it, as PNG at `target` (temporary file, then rename).

    The most confident box is drawn last, so its outline and label lie on top. An image whose
    shorter side is under MIN_DRAWN_SIDE pixels is drawn enlarged by the smallest whole factor that
    reaches it (nearest neighbour: each pixel a block), because a label's text would otherwise
    cover a small image; the boxes in the JSON stay in the original's pixels."""
    with Image.open(image_path) as original:
        # As preprocessing reads it: a 16-bit or float image scaled to 8 bits, not clipped.
        canvas = to_8bit(original).convert("RGB")
    if canvas.size != found.size:
        raise UsageError(f"{image_path}: changed while it was being read ({canvas.size} != {found.size})")
    scale = drawing_scale(canvas.size)
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line = max(1, round(min(canvas.size) / 200))
    for item in sorted(found.objects, key=lambda found_object: found_object.score):
        colour = PALETTE[item.class_index % len(PALETTE)]
        x1, y1, x2, y2 = (value * scale for value in item.box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        label = f"{printable(item.class_name)} {item.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        height = bottom - top
        # Above the box where there is room, else inside its top edge.
        text_y = y1 - height - 2 if y1 - height - 2 >= 0 else y1
        draw.rectangle((x1, text_y, x1 + right - left + 2, text_y + height + 2), fill=colour)
        draw.text((x1 + 1 - left, text_y + 1 - top), label, fill=(255, 255, 255), font=font)
    with atomic_output(target) as tmp:
        canvas.save(tmp, format="PNG")
    return target


class DetectionPredictor:
    """A detector's predictions (deploy.predict.TaskPredictor): each image's boxes, classes and
    scores; `top_k` does not apply (the file keeps at most its max_detections per image)."""

    def predict_each(
        self, runner: Runner, manifest: Mapping[str, Any], image_paths: Sequence[Path], top_k: int
    ) -> list[ImageDetections | UsageError]:
        return detect_each(runner, manifest, image_paths)

    def as_json(self, result: ImageDetections) -> dict[str, Any]:
        return result.as_json()

    def table(self, paths: Sequence[Path], results: Sequence[ImageDetections | UsageError]) -> str:
        return detections_table(paths, results)

    def draw(
        self, paths: Sequence[Path], results: Sequence[ImageDetections | UsageError], save_dir: Path
    ) -> list[Path]:
        if save_dir.exists() and not save_dir.is_dir():
            raise UsageError(f"--save-dir {save_dir}: exists and is not a directory")
        targets = drawn_paths(paths, save_dir)
        return [
            draw_detections(path, result, target)
            for path, result, target in zip(paths, results, targets, strict=True)
            if not isinstance(result, UsageError)
        ]
