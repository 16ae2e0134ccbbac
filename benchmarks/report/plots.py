"""The report's plots, drawn with matplotlib's object API into PNG files beside the report."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.report.assemble import format_entries
from benchmarks.report.document import mb_text
from deploy.fileio import atomic_output
from deploy.optional import optional_import


def _new_figure(width: float, height: float) -> Any:
    # The object API with an explicit Agg canvas: no pyplot, so no global backend switch and no
    # display needed.
    with optional_import("the report's plots"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Any, path: Path) -> Path:
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def plot_latency(report: Mapping[str, Any], path: Path) -> Path | None:
    """p50 latency and throughput against batch size, one line per format; None if nothing was timed."""
    series = {key: e["latency"] for key, e in format_entries(report).items() if e.get("latency")}
    if not series:
        return None
    figure = _new_figure(10, 4)
    ax_lat, ax_tp = figure.subplots(1, 2)
    for key, latency in series.items():
        sizes = sorted(int(b) for b in latency)
        ax_lat.plot(sizes, [latency[str(b)]["p50_ms"] for b in sizes], marker="o", label=key)
        ax_tp.plot(sizes, [latency[str(b)]["throughput_ips"] for b in sizes], marker="o", label=key)
    with optional_import("the report's plots"):
        from matplotlib.ticker import NullFormatter, NullLocator

    ticks = sorted({int(b) for latency in series.values() for b in latency})
    for ax, label in ((ax_lat, "p50 latency (ms)"), (ax_tp, "throughput (images/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # The measured batch sizes as plain numbers, not powers of two.
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_lat.set_title("Latency vs batch size")
    ax_tp.set_title("Throughput vs batch size")
    ax_tp.legend(fontsize="small")
    return _save_png(figure, path)


def plot_accuracy_size(report: Mapping[str, Any], path: Path) -> Path | None:
    """Top-1 and file size per format as bars; None if there is neither."""
    entries = format_entries(report)
    top1 = {
        k: e["accuracy"]["top1"]
        for k, e in entries.items()
        if e.get("accuracy") and e["accuracy"].get("top1") is not None
    }
    size = {k: e["size_bytes"] / 1e6 for k, e in entries.items() if e.get("size_bytes") is not None}
    if not top1 and not size:
        return None
    figure = _new_figure(10, max(2.5, 0.45 * len(entries) + 1.2))
    ax_acc, ax_size = figure.subplots(1, 2)
    for ax, values, label in ((ax_acc, top1, "top-1 (%)"), (ax_size, size, "size (MB)")):
        if values:
            bars = ax.barh(list(values), list(values.values()), color="#4c72b0")
            ax.bar_label(bars, labels=[mb_text(v) if ax is ax_size else f"{v:.2f}" for v in values.values()])
            ax.invert_yaxis()
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
    if top1:
        low = min(top1.values())
        ax_acc.set_xlim(max(0.0, low - 5.0), 100.0)
    ax_acc.set_title("Accuracy per format")
    ax_size.set_title("File size per format")
    return _save_png(figure, path)


def _series(
    records: Sequence[Mapping[str, Any]], words: Sequence[str]
) -> dict[str, tuple[list[float], list[float]]]:
    """Numeric per-epoch series whose name holds one of `words` as a "_"-separated part
    ("val_top1" matches "top1"; "distance" does not match "ce")."""
    names = {
        name
        for record in records
        for name, value in record.items()
        if name != "epoch"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and set(re.split(r"[^a-z0-9]+", name.lower())) & set(words)
    }
    out = {}
    for name in sorted(names):
        points = [
            (float(r["epoch"]), float(r[name])) for r in records if isinstance(r.get(name), int | float)
        ]
        out[name] = ([p[0] for p in points], [p[1] for p in points])
    return out


def plot_training(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Losses and accuracies per epoch from metrics.jsonl; None when there are no records."""
    losses = _series(records, ("loss", "ce", "hcl", "kd"))
    accuracies = _series(records, ("top1", "top5", "acc", "accuracy"))
    if not losses and not accuracies:
        return None
    with optional_import("the report's plots"):
        from matplotlib.ticker import MaxNLocator

    figure = _new_figure(10, 4)
    ax_loss, ax_acc = figure.subplots(1, 2)
    for ax, series, label in ((ax_loss, losses, "loss"), (ax_acc, accuracies, "accuracy")):
        for name, (x, y) in series.items():
            ax.plot(x, y, marker=".", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize="small")
    ax_loss.set_title("Training losses")
    ax_acc.set_title("Accuracy per epoch")
    return _save_png(figure, path)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plot_students(curves: Mapping[str, Sequence[Mapping[str, Any]]], title: str, path: Path) -> Path | None:
    """Validation top-1 per epoch of each student, one line per {label: metrics records}, in one axes;
    None unless at least two students logged a "val_top1"."""
    series = {}
    for label, records in curves.items():
        points = [(float(r["epoch"]), float(r["val_top1"])) for r in records if _is_number(r.get("val_top1"))]
        if points:
            series[label] = points
    if len(series) < 2:
        return None
    with optional_import("the report's plots"):
        from matplotlib.ticker import MaxNLocator

    figure = _new_figure(7, 4)
    ax = figure.subplots()
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return _save_png(figure, path)
