"""A detection run's part of the report: mAP per format with its interval, per-class AP, precision-recall
curves, and a grid of example images with the teacher's, the fp32 student's and the int8 student's
detections side by side.

What it reads, from validate.json as report.json carries it (and the class names, "run"."classes"):

    each format entry's "accuracy"   {"map", "ap50" (percent), "n" or "images" (images), "map_drop"
                                      (points against the reference), "map_drop_interval" ([low,
                                      high], paired image-level bootstrap 95%: deploy.detection.
                                      bootstrap), "per_class_ap", "per_class_ap50" (percent per class
                                      index, None for a class without ground truth), "curves"
                                      (deploy.detection.coco_metric.pr_curves)}
    each format entry's "parity"     box parity against the reference: "box_matched" (percent of its
                                      detections matched by class and IoU)
    "validation"."examples"          validate.json's "examples": {"images": [image file, ...],
                                      "reasons": [why each image was chosen, ...], "rule": how they
                                      were chosen, "detections": {model: [[{"class": index, "score",
                                      "box": [x1, y1, x2, y2] image pixels}, ...] per image]}}, model
                                      "teacher" or a format key

validate records the last two with `class_accuracy`, `choose_examples` and `examples_block`. Missing
pieces are said, never made up: a format without curves is left out of the curves, a
model without examples gets an empty column saying so.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.report.assemble import format_entries
from benchmarks.report.document import (
    FINAL_TABLE_COLUMNS,
    RIGHT,
    Align,
    Column,
    Plot,
    Section,
    Table,
    gate_text,
    number_text,
)
from benchmarks.report.plots import new_figure, save_png
from deploy.detection.bootstrap import IOU_THRESHOLDS, ImageMatches
from deploy.detection.coco_metric import CocoMetrics, pr_curves
from deploy.detection.outputs import Detections
from deploy.detection.parity import box_parity
from deploy.manifest import InputSpec
from deploy.optional import optional_import
from deploy.preprocess import to_original_pixels
from deploy.status import Status

PR_CURVES_PLOT = "pr_curves.png"
EXAMPLES_PLOT = "detection_examples.png"
PLOTS = (PR_CURVES_PLOT, EXAMPLES_PLOT)
TEACHER = "teacher"
FP32 = "onnxruntime/fp32"
INT8 = "onnxruntime/int8"
# The example grid's columns, in order: the teacher, the student as shipped in fp32 and in int8.
EXAMPLE_MODELS = (TEACHER, FP32, INT8)
MAX_EXAMPLE_IMAGES = 6
# How `choose_examples` fills the grid's rows: so many of each kind where the count is above 0, the
# rest typical images.
DISAGREEMENT_ROWS = 2
MISSED_ROWS = 2
# The IoU at which a detection answers for a box of its class, in both counts: COCO's loosest.
EXAMPLE_MATCH_IOU = float(IOU_THRESHOLDS[0])
EXAMPLES_RULE = (
    f"Rows chosen from every validation image: first the {DISAGREEMENT_ROWS} where int8 and fp32 disagree"
    f" most (their detections left without one of the same class at IoU >= {EXAMPLE_MATCH_IOU:g} by the"
    f" other file), then the {MISSED_ROWS} where the fp32 student misses the most ground-truth boxes (none"
    f" of its detections of the box's class at IoU >= {EXAMPLE_MATCH_IOU:g}), each only where its count is"
    " above 0; the other rows typical: the images whose fp32 errors (missed boxes plus detections of no"
    " box) are nearest the median image's. Ties go to the earlier image."
)


# ----------------------------------------------------------------------------- what validate records


def _percent_or_none(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * value


def class_accuracy(metrics: CocoMetrics) -> dict[str, Any]:
    """The keys of a format's "accuracy" that the per-class table and the curves read, from its COCO
    metrics: per-class AP and AP50 in percent (None for a class without ground truth) and the
    precision-recall curves (coco_metric.pr_curves)."""
    return {
        "per_class_ap": [_percent_or_none(v) for v in metrics.per_class_ap],
        "per_class_ap50": [_percent_or_none(v) for v in metrics.per_class_ap50],
        "curves": pr_curves(metrics),
    }


@dataclass(frozen=True)
class Example:
    """One row of the example grid: the image's position in the validation split, and why it is shown."""

    index: int
    reason: str


def _unmatched_between(first: Detections, second: Detections) -> int:
    """The detections of two files on one image that the other file has no detection of the same
    class for at IoU >= EXAMPLE_MATCH_IOU (each detection answering for one at most)."""
    matched = box_parity([first], [second], min_iou=EXAMPLE_MATCH_IOU, max_score_diff=math.inf).matched
    return len(first) + len(second) - 2 * matched


def _most(counts: Sequence[int], taken: Sequence[int], rows: int) -> list[int]:
    """Up to `rows` images not `taken` with the highest count above 0, ties to the earlier image."""
    candidates = [i for i, count in enumerate(counts) if count > 0 and i not in taken]
    return sorted(candidates, key=lambda i: (-counts[i], i))[:rows]


def choose_examples(
    truth: ImageMatches, fp32: Sequence[Detections], int8: Sequence[Detections] | None
) -> list[Example]:
    """The example grid's rows, by EXAMPLES_RULE: at most MAX_EXAMPLE_IMAGES images of the validation
    split, each with its reason. `truth` is the fp32 file's detections matched to the ground truth
    (deploy.detection.bootstrap.match_images, which validate computes for the mAP drops), `fp32` and
    `int8` every image's detections by the two files (None: the run has no int8 file, and no row is
    chosen for their disagreement). Deterministic: the same detections choose the same rows."""
    images = len(truth.truth_count)
    if len(fp32) != images or (int8 is not None and len(int8) != images):
        raise ValueError(f"choose_examples: {images} images of ground truth, detections of a different count")
    loose = 0  # IOU_THRESHOLDS[0], EXAMPLE_MATCH_IOU
    found_boxes = np.bincount(truth.image[truth.true_positive[loose]], minlength=images)
    counted = ~truth.ignored[loose] & ~truth.true_positive[loose]
    false_detections = np.bincount(truth.image[counted], minlength=images)
    boxes = truth.truth_count.sum(axis=1)
    missed = [int(v) for v in boxes - found_boxes]
    errors = [missed[i] + int(false_detections[i]) for i in range(images)]
    chosen: list[Example] = []
    if int8 is not None:
        unmatched = [_unmatched_between(a, b) for a, b in zip(fp32, int8, strict=True)]
        for i in _most(unmatched, [], DISAGREEMENT_ROWS):
            total = len(fp32[i]) + len(int8[i])
            reason = f"int8 and fp32 disagree: {unmatched[i]} of their {total} detections unmatched"
            chosen.append(Example(i, reason))
    for i in _most(missed, [e.index for e in chosen], MISSED_ROWS):
        chosen.append(Example(i, f"fp32 misses {missed[i]} of {int(boxes[i])} ground-truth boxes"))
    median = float(np.median(errors))
    taken = {e.index for e in chosen}
    typical = sorted((i for i in range(images) if i not in taken), key=lambda i: (abs(errors[i] - median), i))
    for i in typical[: MAX_EXAMPLE_IMAGES - len(chosen)]:
        chosen.append(Example(i, f"typical: {errors[i]} fp32 errors against the truth (median {median:g})"))
    return chosen


def examples_block(
    images: Sequence[str | os.PathLike[str]],
    sizes: Sequence[tuple[int, int]],
    spec: InputSpec,
    found: Mapping[str, Sequence[Detections]],
    reasons: Sequence[str],
) -> dict[str, Any]:
    """validate.json's "examples": the chosen `images` (files, each of its size (width, height)), why
    each was chosen (`reasons`, by EXAMPLES_RULE, which is recorded with them) and, per model
    ("teacher" or a format key), their detections as the model's input saw them
    (deploy.detection.outputs.Detections, input pixels, one per chosen image), mapped back onto each
    file's pixels as the manifest's input block says."""
    if not len(images) == len(sizes) == len(reasons):
        raise ValueError("examples_block: give one size and one reason per image")
    shown = range(len(images))
    return {
        "images": [str(images[i]) for i in shown],
        "reasons": list(reasons),
        "rule": EXAMPLES_RULE,
        "detections": {
            model: [
                [
                    {"class": int(label), "score": float(score), "box": [round(float(v), 2) for v in box]}
                    for box, score, label in zip(
                        to_original_pixels(per_image[i].boxes, sizes[i], spec),
                        per_image[i].scores,
                        per_image[i].classes,
                        strict=True,
                    )
                ]
                for i in shown
            ]
            for model, per_image in found.items()
        },
    }


# ----------------------------------------------------------------------------- the sections


def _accuracy(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    accuracy = entry.get("accuracy")
    return accuracy if isinstance(accuracy, Mapping) else {}


def _drop(entry: Mapping[str, Any]) -> str:
    accuracy = _accuracy(entry)
    if entry.get("reference") and accuracy:
        return "ref"
    drop, interval = accuracy.get("map_drop"), accuracy.get("map_drop_interval")
    if drop is None or not interval:
        return "-"
    return f"{drop:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def _classification_column(header: str) -> Column:
    return next(column for column in FINAL_TABLE_COLUMNS if column.header == header)


# The final table of a detection run: the classifier's, with mAP, its drop and AP50 for top-1,
# its drop and the agreement.
FINAL_COLUMNS: tuple[Column, ...] = (
    *(_classification_column(header) for header in ("format", "status", "size MB")),
    Column("mAP %", RIGHT, lambda key, entry, batch: number_text(_accuracy(entry).get("map"))),
    Column("drop [95% CI]", RIGHT, lambda key, entry, batch: _drop(entry)),
    Column("AP50 %", RIGHT, lambda key, entry, batch: number_text(_accuracy(entry).get("ap50"))),
    *(_classification_column(header) for header in ("p50 ms @1", "img/s @{batch}")),
)


def _images(entry: Mapping[str, Any]) -> str:
    accuracy = _accuracy(entry)
    return str(accuracy.get("n", accuracy.get("images", "-")))


def _box_match(entry: Mapping[str, Any]) -> str:
    parity = entry.get("parity")
    return number_text(parity.get("box_matched")) if isinstance(parity, Mapping) else "-"


def map_table(report: Mapping[str, Any]) -> Table:
    """mAP@[.5:.95] and AP50 per format, the mAP drop against the reference with its interval, the
    share of the reference's boxes the format matched, and the gates' verdicts."""
    header = ("format", "status", "mAP %", "AP50 %", "mAP drop [95% CI]", "box match %", "n", "gates")
    rows = tuple(
        (
            key,
            str(entry["status"]),
            number_text(_accuracy(entry).get("map")),
            number_text(_accuracy(entry).get("ap50")),
            _drop(entry),
            _box_match(entry),
            _images(entry),
            gate_text(entry),
        )
        for key, entry in format_entries(report).items()
    )
    align: tuple[Align, ...] = ("left", "left", RIGHT, RIGHT, RIGHT, RIGHT, RIGHT, "left")
    return Table(header, rows, align, status_column=1)


def per_class_table(report: Mapping[str, Any]) -> Table | None:
    """AP@[.5:.95] of each class (rows) per format measured (columns); None when no format has any."""
    classes = (report.get("run") or {}).get("classes") or []
    measured = {
        key: _accuracy(entry)["per_class_ap"]
        for key, entry in format_entries(report).items()
        if isinstance(_accuracy(entry).get("per_class_ap"), list)
    }
    if not measured:
        return None
    count = max(len(values) for values in measured.values())
    names = [classes[k] if k < len(classes) else str(k) for k in range(count)]
    rows = tuple(
        (name, *(number_text(values[k]) if k < len(values) else "-" for values in measured.values()))
        for k, name in enumerate(names)
    )
    return Table(("class", *measured), rows, ("left", *(RIGHT for _ in measured)))


def sections(report: Mapping[str, Any], plots: Sequence[Plot]) -> tuple[Section, ...]:
    """The detection sections, in reading order, with their plots where drawn."""
    validation = report.get("validation") or {}
    if validation.get("status") == Status.NOT_MEASURED:
        return (Section("Detection: mAP per format", note=validation.get("reason")),)
    source = validation.get("source_text") or "inputs not recorded"
    reference = validation.get("reference") or "-"
    by_name = {plot.path.name: plot for plot in plots}
    per_class = per_class_table(report)
    curves = tuple(by_name[name] for name in (PR_CURVES_PLOT,) if name in by_name)
    examples = tuple(by_name[name] for name in (EXAMPLES_PLOT,) if name in by_name)
    return (
        Section(
            "Detection: mAP per format",
            note=f"COCO mAP@[.5:.95] and AP50 on {source}; drops in points against {reference}, with a"
            " paired image-level bootstrap 95% interval.",
            table=map_table(report),
        ),
        Section(
            "Detection: AP per class (mAP@[.5:.95] %)",
            note=None if per_class is not None else "No format recorded per-class AP.",
            table=per_class,
            plots=curves,
        ),
        Section(
            "Detection: examples",
            note=_examples_note(report, drawn=bool(examples)),
            bullets=_example_rows(report),
            plots=examples,
        ),
    )


def _examples_note(report: Mapping[str, Any], drawn: bool) -> str:
    """The grid's caption: the rule its rows were chosen by, and why it is not drawn where it is not."""
    examples = (report.get("validation") or {}).get("examples")
    if not examples:
        return "validate recorded no example detections."
    rule = examples.get("rule") or "The first validation images (validate recorded no rule)."
    columns = f"Columns: {', '.join(EXAMPLE_MODELS)}; each row is labelled with why it was chosen."
    return f"{rule} {columns}" if drawn else f"{rule} Not drawn: {report.get('plots_note') or 'no plot'}"


def _example_rows(report: Mapping[str, Any]) -> tuple[str, ...]:
    """One line per row of the grid: its image file and why it was chosen."""
    examples = (report.get("validation") or {}).get("examples") or {}
    images, reasons = examples.get("images") or [], examples.get("reasons") or []
    return tuple(
        f"row {row}, {Path(image).name}: {reason}"
        for row, (image, reason) in enumerate(zip(images, reasons, strict=False), start=1)
    )


# ----------------------------------------------------------------------------- plots


def plot_pr_curves(report: Mapping[str, Any], path: Path) -> Path | None:
    """Precision against recall, averaged over the classes with ground truth, one line per format
    (solid: over IoU .5:.95, dashed: IoU .5); None when no format recorded curves."""
    series = {}
    for key, entry in format_entries(report).items():
        curves = _accuracy(entry).get("curves")
        if isinstance(curves, Mapping) and curves.get("recall"):
            series[key] = curves
    if not series:
        return None
    figure = new_figure(7, 4.5)
    ax = figure.subplots()
    for index, (key, curves) in enumerate(series.items()):
        colour = f"C{index}"
        for name, style, label in (("precision", "-", key), ("precision50", "--", f"{key} (IoU .5)")):
            mean = _class_mean_curve(curves.get(name) or [])
            if mean is not None:
                ax.plot(curves["recall"], mean, style, color=colour, label=label)
    ax.set_xlabel("recall (%)")
    ax.set_ylabel("precision (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 101)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Precision-recall, mean over classes")
    return save_png(figure, path)


def _class_mean_curve(per_class: Sequence[Sequence[float] | None]) -> list[float] | None:
    present = [curve for curve in per_class if curve]
    if not present:
        return None
    return [sum(values) / len(values) for values in zip(*present, strict=True)]


def plot_examples(report: Mapping[str, Any], path: Path) -> Path | None:
    """The example images, one row each, labelled with its file and why it was chosen, with each
    model's detections drawn (teacher, fp32, int8); None when validate recorded no examples."""
    examples = (report.get("validation") or {}).get("examples")
    if not isinstance(examples, Mapping) or not examples.get("images"):
        return None
    images = list(examples["images"])[:MAX_EXAMPLE_IMAGES]
    reasons = list(examples.get("reasons") or [])
    found = examples.get("detections") or {}
    classes = (report.get("run") or {}).get("classes") or []
    figure = new_figure(3.2 * len(EXAMPLE_MODELS), 2.4 * len(images))
    axes = figure.subplots(len(images), len(EXAMPLE_MODELS), squeeze=False)
    for row, image_path in enumerate(images):
        try:
            with Image.open(image_path) as image:
                pixels = image.convert("RGB")
        except OSError:
            pixels = None
        for column, model in enumerate(EXAMPLE_MODELS):
            ax = axes[row][column]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(model, fontsize="small")
            if column == 0:
                reason = reasons[row] if row < len(reasons) else None
                ax.set_ylabel(_row_label(image_path, reason), fontsize=6)
            if pixels is None:
                unreadable = f"{Path(image_path).name}: not readable"
                ax.text(0.5, 0.5, unreadable, ha="center", va="center", transform=ax.transAxes, fontsize=7)
                continue
            ax.imshow(pixels)
            per_image = found.get(model)
            if not isinstance(per_image, list) or row >= len(per_image):
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
                continue
            # The most confident last, so its outline and label lie on top of the others'.
            for item in sorted(per_image[row], key=_drawing_order):
                _draw_box(ax, item, classes)
    return save_png(figure, path)


def _row_label(image_path: str, reason: str | None) -> str:
    """A row's label beside the grid: the image file and, wrapped, why the row was chosen."""
    name = Path(image_path).name
    return name if reason is None else f"{name}\n" + textwrap.fill(reason, width=34)


def _drawing_order(item: Mapping[str, Any]) -> float:
    """A detection's place in the drawing order: its score, an unscored box first."""
    score = float(item["score"])
    return score if math.isfinite(score) else -math.inf


def _draw_box(ax: Any, item: Mapping[str, Any], classes: Sequence[str]) -> None:
    with optional_import("the report's plots"):
        from matplotlib.patches import Rectangle

    index = int(item["class"])
    x1, y1, x2, y2 = (float(v) for v in item["box"])
    colour = f"C{index % 10}"
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.2))
    name = classes[index] if index < len(classes) else str(index)
    score = float(item["score"])
    label = f"{name} {score:.2f}" if math.isfinite(score) else name
    ax.text(x1, y1, label, color="white", fontsize=6, va="bottom", bbox={"facecolor": colour, "pad": 0.5})


def draw_plots(report: Mapping[str, Any], out: Path) -> list[Plot]:
    """Draw the detection plots that have data into `out`."""
    drawn = {
        "precision-recall curves per format": plot_pr_curves(report, out / PR_CURVES_PLOT),
        "examples: teacher, student fp32 and int8 detections": plot_examples(report, out / EXAMPLES_PLOT),
    }
    return [Plot(title, file) for title, file in drawn.items() if file is not None]
