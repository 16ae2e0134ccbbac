"""The report's part for each task, looked up by the task the run's manifest records (deploy.tasks).

Every name of deploy.tasks.TASKS has an entry (a test holds the key sets equal): the final table's
columns, the plots the task draws beside the general ones, and the sections it adds after the
accuracy section. Classification's
accuracy, parity and latency are the general report's own, so its entry adds nothing to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from benchmarks.report import detection, document
from benchmarks.report.document import Column, Plot, Section
from deploy.tasks import CLASSIFICATION, DETECTION


class ReportTask(Protocol):
    """One task's part of the report."""

    @property
    def final_columns(self) -> tuple[Column, ...]:
        """The final table's columns (benchmarks.report.document.Column)."""
        ...

    @property
    def classifier_accuracy(self) -> bool:
        """Whether the general accuracy section (top-1, logit parity) applies to the task's models."""
        ...

    @property
    def plot_files(self) -> tuple[str, ...]:
        """The names of the PNGs it may draw into RUN/report (an old one not drawn now is removed)."""
        ...

    def draw(self, report: Mapping[str, Any], out: Path) -> list[Plot]:
        """Draw its plots that have data into `out` (matplotlib is installed when this is called)."""
        ...

    def sections(self, report: Mapping[str, Any], plots: Sequence[Plot]) -> tuple[Section, ...]:
        """Its sections, showing `plots` (what `draw` drew; none without matplotlib)."""
        ...


class ClassificationReport:
    """Classification: the general report is its report."""

    classifier_accuracy = True
    plot_files: tuple[str, ...] = ()

    @property
    def final_columns(self) -> tuple[Column, ...]:
        return document.FINAL_TABLE_COLUMNS  # read when asked: a column added there shows at once

    def draw(self, report: Mapping[str, Any], out: Path) -> list[Plot]:
        return []

    def sections(self, report: Mapping[str, Any], plots: Sequence[Plot]) -> tuple[Section, ...]:
        return ()


class DetectionReport:
    """Detection: mAP per format, per-class AP, precision-recall curves and the example grid."""

    classifier_accuracy = False
    final_columns: tuple[Column, ...] = detection.FINAL_COLUMNS
    plot_files: tuple[str, ...] = detection.PLOTS

    def draw(self, report: Mapping[str, Any], out: Path) -> list[Plot]:
        return detection.draw_plots(report, out)

    def sections(self, report: Mapping[str, Any], plots: Sequence[Plot]) -> tuple[Section, ...]:
        return detection.sections(report, plots)


REPORT_TASKS: dict[str, ReportTask] = {
    CLASSIFICATION: ClassificationReport(),
    DETECTION: DetectionReport(),
}
