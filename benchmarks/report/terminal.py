"""The report on the terminal: the headline, the final table, and why each format is not ok."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tabulate import tabulate

from benchmarks.report.document import ReportDocument, Table, build_document
from benchmarks.report.tasks import REPORT_TASKS
from deploy.tasks import DEFAULT_TASK


def text_table(table: Table) -> str:
    """`table` as aligned plain text: columns two spaces apart, a dashed rule under the header.

    The rule is a row of its own rather than tabulate's "simple" header line, which pads every
    header by two extra spaces and would widen the table past 80 columns.
    """
    cells = [table.header, *table.rows]
    rule = tuple("-" * max(len(row[i]) for row in cells) for i in range(len(table.header)))
    return tabulate(
        [table.header, rule, *table.rows],
        tablefmt="plain",
        colalign=table.align,
        disable_numparse=True,
    )


def render_terminal(document: ReportDocument) -> str:
    """The headline, the final table, then one line per format that is not ok and the failed gates."""
    return "\n".join([document.headline, text_table(document.final_table), *document.format_notes])


def format_final_table(report: Mapping[str, Any]) -> str:
    """Return what `reviewkd run` and `reviewkd report` print for report.json's content `report`:
    the distillation headline, the table (format, status, size, the task's accuracy columns: top-1
    and agreement, or mAP and AP50; p50 @1, img/s @largest batch), and one line per format that is
    not ok, giving the reason."""
    columns = REPORT_TASKS[report.get("task", DEFAULT_TASK)].final_columns
    return render_terminal(build_document(report, columns=columns))
