"""`write_report`: assemble report.json, draw the plots, render report.md and report.html, record them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.report.assemble import build_report
from benchmarks.report.document import Plot, build_document
from benchmarks.report.html import render_html
from benchmarks.report.markdown import render_markdown
from benchmarks.report.plots import (
    plot_accuracy_size,
    plot_latency,
    plot_latency_distribution,
    plot_pareto,
    plot_students,
    plot_training,
)
from benchmarks.report.results import PathLike, read_metrics, record_report_files, report_dir
from benchmarks.report.tasks import REPORT_TASKS
from deploy import run_layout
from deploy.fileio import write_json_atomic, write_text_atomic
from deploy.optional import installed

LATENCY_PLOT = "latency.png"
ACCURACY_SIZE_PLOT = "accuracy_size.png"
TRAINING_PLOT = "training.png"
STUDENTS_PLOT = "students.png"
PARETO_PLOT = "pareto.png"
DISTRIBUTION_PLOT = "latency_distribution.png"
PLOTS: tuple[str, ...] = (
    LATENCY_PLOT,
    DISTRIBUTION_PLOT,
    ACCURACY_SIZE_PLOT,
    PARETO_PLOT,
    TRAINING_PLOT,
    STUDENTS_PLOT,
)
# Every PNG any task's part of the report may draw: one not drawn this time is removed.
TASK_PLOTS: tuple[str, ...] = tuple(name for task in REPORT_TASKS.values() for name in task.plot_files)
NO_MATPLOTLIB = (
    "not drawn: matplotlib is not installed (the edge install leaves it out);"
    " pip install 'reviewkd[plots]' to draw them"
)


def _student_curves(run_dir: PathLike, report: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{legend label: metrics records} of the run's student and, when the run has one, its
    cross-entropy baseline (a run directory inside this one, named by the manifest)."""
    gain = report.get("distillation") or {}
    curves = {f"{gain.get('method') or 'distilled'} student": read_metrics(run_dir)}
    baseline_run = gain.get("baseline_run")
    if isinstance(baseline_run, str) and baseline_run:
        curves["cross-entropy student"] = read_metrics(Path(run_dir) / baseline_run)
    return curves


def _students_title(report: Mapping[str, Any]) -> str:
    gain = report.get("distillation") or {}
    if gain.get("gain_points") is None:
        return "Validation top-1 per epoch"
    return (
        f"Validation top-1 per epoch ({gain['method']} vs cross-entropy: {gain['gain_points']:+.2f} points)"
    )


def _draw_plots(run_dir: PathLike, report: Mapping[str, Any], out: Path) -> list[Plot]:
    """Draw every plot that has data; return them in the order the report shows them."""
    drawn = {
        "latency vs batch size": plot_latency(report, out / LATENCY_PLOT),
        "latency distribution per format and batch size": plot_latency_distribution(
            report, out / DISTRIBUTION_PLOT
        ),
        "accuracy and size per format": plot_accuracy_size(report, out / ACCURACY_SIZE_PLOT),
        "accuracy vs latency (and energy) per format, Pareto front": plot_pareto(report, out / PARETO_PLOT),
        "training curves": plot_training(read_metrics(run_dir), out / TRAINING_PLOT),
        "validation top-1 per epoch: distilled vs cross-entropy student": plot_students(
            _student_curves(run_dir, report), _students_title(report), out / STUDENTS_PLOT
        ),
    }
    return [Plot(title, path) for title, path in drawn.items() if path is not None]


def write_report(run_dir: PathLike) -> dict[str, Any]:
    """Build the report and write RUN/report/report.json, report.md, report.html and the PNGs.

    Returns the report (report.json's content). Plots without data are not drawn (an old PNG
    of that name is removed, so the folder never shows a stale picture). Every written file is
    recorded in the manifest with kind "report".
    """
    report = build_report(run_dir)
    out = report_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_file, markdown_file, html_file = (
        run_layout.run_path(run_dir, name)
        for name in (run_layout.REPORT_JSON, run_layout.REPORT_MARKDOWN, run_layout.REPORT_HTML)
    )
    # matplotlib and its fonts are a third of the edge install; without it the report has no PNGs.
    has_matplotlib = installed("matplotlib")
    plots = _draw_plots(run_dir, report, out) if has_matplotlib else []
    task = REPORT_TASKS[report["task"]]
    task_plots = task.draw(report, out) if has_matplotlib else []
    drawn = {plot.path for plot in (*plots, *task_plots)}
    stale = [out / name for name in (*PLOTS, *TASK_PLOTS) if out / name not in drawn]
    for path in stale:
        path.unlink(missing_ok=True)
    report["plots"] = [plot.path.name for plot in (*plots, *task_plots)]
    if not has_matplotlib:
        report["plots_note"] = NO_MATPLOTLIB
    layerwise = [
        Plot(f"Layer-wise parity: onnxruntime/{fmt}", out / entry["plot"])
        for fmt, entry in report.get("layerwise", {}).items()
        if (out / entry["plot"]).is_file()
    ]
    document = build_document(
        report,
        [*plots, *layerwise],
        task.sections(report, task_plots),
        task.final_columns,
        task.classifier_accuracy,
    )
    write_json_atomic(json_file, report)
    write_text_atomic(markdown_file, render_markdown(document))
    write_text_atomic(html_file, render_html(document))
    written = [json_file, markdown_file, html_file, *(plot.path for plot in (*plots, *task_plots))]
    record_report_files(run_dir, written, stale)
    return report
