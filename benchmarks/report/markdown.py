"""report.md: the report document as Markdown, the plots linked as the PNG files beside it."""

from __future__ import annotations

from tabulate import tabulate

from benchmarks.report.document import ReportDocument, Section, Table


def markdown_table(table: Table) -> str:
    """`table` as a Markdown pipe table, aligned as its columns are; "|" in a cell is escaped."""

    def escape(cells: tuple[str, ...]) -> list[str]:
        return [cell.replace("|", "\\|") for cell in cells]

    return tabulate(
        [escape(row) for row in table.rows],
        escape(table.header),
        tablefmt="pipe",
        colalign=table.align,
        disable_numparse=True,
    )


def _section(section: Section) -> list[str]:
    lines = [f"## {section.title}", ""]
    if section.note:
        lines += [section.note, ""]
    if section.table is not None:
        lines += [markdown_table(section.table), ""]
    if section.bullets:
        lines += [*(f"- {bullet}" for bullet in section.bullets), ""]
    if section.plots:
        lines += [*(f"![{plot.title}]({plot.path.name})" for plot in section.plots), ""]
    return lines


def render_markdown(document: ReportDocument) -> str:
    """Return report.md: the headline, the run's information, then every section in order."""
    lines = [f"# {document.title}", "", f"**{document.headline}**", ""]
    lines += [*(f"- {line}" for line in document.run), ""]
    for section in document.sections:
        lines += _section(section)
    return "\n".join(lines)
