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
                                      "detections": {model: [[{"class": index, "score", "box": [x1,
                                      y1, x2, y2] image pixels}, ...] per image]}}, model "teacher"
                                      or a format key

validate records the last two with `class_accuracy` and `examples_block`. Missing pieces are said,
never made up: a format without curves is left out of the curves, a
model without examples gets an empty column saying so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from deploy.detection.coco_metric import CocoMetrics, pr_curves
from deploy.detection.outputs import Detections
from deploy.manifest import InputSpec
from deploy.optional import optional_import
from deploy.preprocess import to_original_pixels
from deploy.status import Status

PR_CURVES_PLOT = "pr_curves.png"
EXAMPLES_PLOT = "detection_examples.png"
PLOTS = (PR_CURVES_PLOT, EXAMPLES_PLOT)
TEACHER = "teacher"
# The example grid's columns, in order: the teacher, the student as shipped in fp32 and in int8.
EXAMPLE_MODELS = (TEACHER, "onnxruntime/fp32", "onnxruntime/int8")
MAX_EXAMPLE_IMAGES = 6


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


def examples_block(
    images: Sequence[str | os.PathLike[str]],
    sizes: Sequence[tuple[int, int]],
    spec: InputSpec,
    found: Mapping[str, Sequence[Detections]],
) -> dict[str, Any]:
    """validate.json's "examples": the first MAX_EXAMPLE_IMAGES `images` (files, each of its size
    (width, height)) and, per model ("teacher" or a format key), their detections as the model's
    input saw them (deploy.detection.outputs.Detections, input pixels), mapped back onto each file's
    pixels as the manifest's input block says."""
    shown = range(min(len(images), MAX_EXAMPLE_IMAGES))
    return {
        "images": [str(images[i]) for i in shown],
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
            note=None if examples else _examples_note(report, plots),
            plots=examples,
        ),
    )


def _examples_note(report: Mapping[str, Any], plots: Sequence[Plot]) -> str:
    if not (report.get("validation") or {}).get("examples"):
        return "validate recorded no example detections."
    return report.get("plots_note") or "not drawn"


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
    """The example images, one row each, with each model's detections drawn (teacher, fp32, int8);
    None when validate recorded no examples."""
    examples = (report.get("validation") or {}).get("examples")
    if not isinstance(examples, Mapping) or not examples.get("images"):
        return None
    images = list(examples["images"])[:MAX_EXAMPLE_IMAGES]
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
            if pixels is None:
                unreadable = f"{Path(image_path).name}: not readable"
                ax.text(0.5, 0.5, unreadable, ha="center", va="center", transform=ax.transAxes, fontsize=7)
                continue
            ax.imshow(pixels)
            per_image = found.get(model)
            if not isinstance(per_image, list) or row >= len(per_image):
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
                continue
            for item in per_image[row]:
                _draw_box(ax, item, classes)
    return save_png(figure, path)


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
