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


def new_figure(width: float, height: float) -> Any:
    # The object API with an explicit Agg canvas: no pyplot, so no global backend switch and no
    # display needed.
    with optional_import("the report's plots"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, path: Path) -> Path:
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def plot_latency(report: Mapping[str, Any], path: Path) -> Path | None:
    """p50 latency and throughput against batch size, one line per format; None if nothing was timed."""
    series = {key: e["latency"] for key, e in format_entries(report).items() if e.get("latency")}
    if not series:
        return None
    figure = new_figure(10, 4)
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
    return save_png(figure, path)


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
    figure = new_figure(10, max(2.5, 0.45 * len(entries) + 1.2))
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
    return save_png(figure, path)


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

    figure = new_figure(10, 4)
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
    return save_png(figure, path)


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

    figure = new_figure(7, 4)
    ax = figure.subplots()
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return save_png(figure, path)


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """The keys of {key: (cost, accuracy)} that no other point dominates (as low a cost and as high
    an accuracy, one of them strictly), cheapest first."""
    front = [
        key
        for key, (cost, accuracy) in points.items()
        if not any(
            other[0] <= cost and other[1] >= accuracy and other != (cost, accuracy)
            for other in points.values()
        )
    ]
    return sorted(front, key=lambda key: points[key])


def _smallest_batch(entry: Mapping[str, Any]) -> str | None:
    latency = entry.get("latency") or {}
    return min(latency, key=int) if latency else None


Points = dict[str, tuple[float, float]]


def pareto_points(report: Mapping[str, Any]) -> tuple[Points, Points, str]:
    """({format: (p50 ms, top-1)}, {format: (mJ per image, top-1)}, the batch label) at each format's
    smallest timed batch; formats without a top-1 or a timing are left out, and energy only where
    it was measured."""
    latency: Points = {}
    energy: Points = {}
    batches = set()
    for key, entry in format_entries(report).items():
        top1 = (entry.get("accuracy") or {}).get("top1")
        batch = _smallest_batch(entry)
        if top1 is None or batch is None:
            continue
        stats = entry["latency"][batch]
        batches.add(batch)
        latency[key] = (float(stats["p50_ms"]), float(top1))
        total = (stats.get("energy") or {}).get("total_mj_per_image")
        if isinstance(total, int | float):
            energy[key] = (float(total), float(top1))
    label = f"batch {', '.join(sorted(batches, key=int))}"
    return latency, energy, label


def plot_pareto(report: Mapping[str, Any], path: Path) -> Path | None:
    """Top-1 against p50 latency (and against energy per image where measured) per format, each
    format's smallest timed batch, with the Pareto front drawn; None without two formats having both."""
    latency, energy, batch = pareto_points(report)
    if len(latency) < 2:
        return None
    panels = [(latency, f"p50 latency (ms), {batch}")]
    if energy:
        panels.append((energy, f"energy per image (mJ, above idle), {batch}"))
    figure = new_figure(5 * len(panels) + 1, 4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (points, label) in zip(axes, panels, strict=True):
        front = pareto_front(points)
        for key, (cost, accuracy) in points.items():
            ax.scatter([cost], [accuracy], marker="o" if key in front else "x", zorder=3)
            ax.annotate(key, (cost, accuracy), textcoords="offset points", xytext=(4, 4), fontsize="small")
        costs, accuracies = [points[k][0] for k in front], [points[k][1] for k in front]
        ax.step(costs, accuracies, where="post", alpha=0.5, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_title("Accuracy vs latency per format")
    if energy:
        axes[1].set_title("Accuracy vs energy per format")
    return save_png(figure, path)


def plot_latency_distribution(report: Mapping[str, Any], path: Path) -> Path | None:
    """Each measurement's latency distribution as a percentile curve (its recorded 0th to 100th
    percentiles), one panel per batch size, one line per format; None when no measurement recorded one."""
    curves: dict[int, dict[str, list[float]]] = {}
    for key, entry in format_entries(report).items():
        for batch, stats in (entry.get("latency") or {}).items():
            if stats.get("percentiles_ms"):
                curves.setdefault(int(batch), {})[key] = stats["percentiles_ms"]
    if not curves:
        return None
    figure = new_figure(4.5 * len(curves) + 1, 4)
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for ax, batch in zip(axes, sorted(curves), strict=True):
        for key, percentiles in curves[batch].items():
            ranks = [100.0 * i / (len(percentiles) - 1) for i in range(len(percentiles))]
            ax.plot(percentiles, ranks, label=key)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("percentile of calls")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize="small")
    return save_png(figure, path)
