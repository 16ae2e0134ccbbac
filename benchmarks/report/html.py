"""report.html: the report document as one self-contained page, every plot embedded as a base64 PNG
(no scripts, no links, nothing fetched)."""

from __future__ import annotations

import base64
import html

from tabulate import tabulate

from benchmarks.report.document import Plot, ReportDocument, Section, Table

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222}
body{max-width:1100px}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left}
th{background:#f0f0f0}
.ok{color:#1a7f37}.failed{color:#cf222e;font-weight:bold}.skipped{color:#9a6700}.not-measured{color:#777}
.headline{font-size:1.15em;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{color:#555}
"""


def html_table(table: Table) -> str:
    """`table` as an HTML table, every cell escaped; status cells carry their status as a CSS class."""

    def cells(row: tuple[str, ...]) -> list[str]:
        out = [html.escape(cell) for cell in row]
        if table.status_column is not None:
            status = row[table.status_column]
            css_class = status.replace(" ", "-")
            out[table.status_column] = f'<span class="{css_class}">{html.escape(status)}</span>'
        return out

    return tabulate(
        [cells(row) for row in table.rows],
        [html.escape(cell) for cell in table.header],
        tablefmt="unsafehtml",  # the cells are escaped above
        colalign=table.align,
        disable_numparse=True,
    )


def _list(lines: tuple[str, ...], css_class: str | None = None) -> str:
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<ul{attribute}>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}"></figure>'


def _section(section: Section) -> list[str]:
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    if section.note:
        parts.append(f'<p class="note">{html.escape(section.note)}</p>')
    if section.table is not None:
        parts.append(html_table(section.table))
    if section.bullets:
        parts.append(_list(section.bullets, "note" if section.table is not None else None))
    parts += [_figure(plot) for plot in section.plots]
    return parts


def render_html(document: ReportDocument) -> str:
    """Return report.html: the headline, the run's information, then every section in order."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(document.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(document.title)}</h1>",
        f'<p class="headline">{html.escape(document.headline)}</p>',
        _list(document.run),
    ]
    for section in document.sections:
        parts += _section(section)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
