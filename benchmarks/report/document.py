"""The report as one document: what every renderer (Markdown, HTML, terminal) shows, as text.

`build_document` turns report.json's content into a `ReportDocument`: a headline (the
distillation gain), the run's information, and sections holding tables of strings, bullet lines,
notes and plots. The renderers only lay that out, so the three outputs cannot drift apart.

The final table's columns are `FINAL_TABLE_COLUMNS`; a new column is one `Column(...)` line there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks.machine_state import OTHER_CPU_SHARE_LIMIT, field_text, is_unknown, state_lines, usage_text
from benchmarks.report.assemble import format_entries
from benchmarks.stability import (
    MAX_WARMUP_ITERS,
    MAX_WARMUP_SECONDS,
    MIN_JUDGED_ITERS,
    NOISY_ADVICE,
    NOISY_CV,
    NOISY_TAIL_RATIO,
    STEADY_TOLERANCE,
    STEADY_WINDOW,
)
from benchmarks.trt_breakdown import breakdown_text
from deploy.status import Status

TITLE = "reviewkd report"
Align = Literal["left", "right"]
RIGHT: Align = "right"


@dataclass(frozen=True)
class Table:
    """Rows of text under a header; `status_column` marks the column holding a format's status."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: tuple[Align, ...]
    status_column: int | None = None


@dataclass(frozen=True)
class Plot:
    """A PNG written beside the report, with the caption it is shown under."""

    title: str
    path: Path


@dataclass(frozen=True)
class Section:
    """A titled part of the report: a note, a table, bullet lines and plots, shown in that order."""

    title: str
    note: str | None = None
    table: Table | None = None
    bullets: tuple[str, ...] = ()
    plots: tuple[Plot, ...] = ()


@dataclass(frozen=True)
class ReportDocument:
    """Everything a renderer shows. The final table and the notes under it are what the terminal
    prints; the other renderers show them as the "Formats" section, followed by the rest."""

    title: str
    headline: str
    run: tuple[str, ...]
    final_table: Table
    format_notes: tuple[str, ...]
    accuracy: Section | None  # None where the task's own sections show accuracy (a detector's mAP)
    latency: Section
    plots: Section
    environment: Section
    layerwise: Section | None = None  # present when `reviewkd layerwise` left reports in the run
    task_sections: tuple[Section, ...] = ()  # the run's task's own (benchmarks.report.tasks)

    @property
    def sections(self) -> tuple[Section, ...]:
        """The sections in reading order."""
        formats = Section("Formats", table=self.final_table, bullets=self.format_notes)
        layerwise = () if self.layerwise is None else (self.layerwise,)
        accuracy = () if self.accuracy is None else (self.accuracy,)
        return (
            formats,
            *accuracy,
            *self.task_sections,
            *layerwise,
            self.latency,
            self.plots,
            self.environment,
        )


# ----------------------------------------------------------------------------- numbers as text


def number_text(value: Any, digits: int = 2) -> str:
    """`value` with `digits` decimals; "-" for a missing value or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def mb_text(megabytes: float) -> str:
    """A file size in MB: two decimals, or three significant digits below 0.1 MB, where two
    decimals would hide a small model's file entirely."""
    return f"{megabytes:.2f}" if megabytes >= 0.1 else f"{megabytes:.3g}"


def largest_batch(report: Mapping[str, Any]) -> int | None:
    """Return the largest batch size any format was timed at (None when nothing was timed)."""
    sizes = [int(b) for entry in format_entries(report).values() for b in entry.get("latency", {})]
    return max(sizes) if sizes else None


# ----------------------------------------------------------------------------- the final table


@dataclass(frozen=True)
class Column:
    """One column of the final table: its header ("{batch}" is the largest batch timed), its
    alignment, and its cell from (report key, format entry, largest batch)."""

    header: str
    align: Align
    cell: Callable[[str, Mapping[str, Any], int | None], str]


def _size_mb(entry: Mapping[str, Any]) -> str:
    size = entry.get("size_bytes")
    return "-" if size is None else mb_text(size / 1e6)


def _top1(entry: Mapping[str, Any]) -> str:
    return number_text((entry.get("accuracy") or {}).get("top1"))


def _drop_interval(entry: Mapping[str, Any]) -> str:
    """The top-1 drop against the reference with its paired 95% interval, in points."""
    accuracy = entry.get("accuracy") or {}
    if entry.get("reference") and accuracy:
        return "ref"
    interval = accuracy.get("top1_drop_ci")
    if not interval or accuracy.get("top1_drop") is None:
        return "-"
    return f"{accuracy['top1_drop']:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def _agreement(entry: Mapping[str, Any]) -> str:
    if entry.get("reference") and entry.get("accuracy"):
        return "ref"
    return number_text((entry.get("parity") or {}).get("top1_agreement"))


def _p50_at_one(entry: Mapping[str, Any]) -> str:
    stats = entry.get("latency", {}).get("1")
    return "-" if stats is None else number_text(stats["p50_ms"], 3)


def _throughput_at(entry: Mapping[str, Any], batch: int | None) -> str:
    latency = entry.get("latency", {})
    if not latency or batch is None:
        return "-"
    if str(batch) in latency:
        return number_text(latency[str(batch)]["throughput_ips"], 0)
    # Engines with a smaller batch profile: show their largest, labelled.
    own = max(int(b) for b in latency)
    return f"{number_text(latency[str(own)]['throughput_ips'], 0)} (@{own})"


FINAL_TABLE_COLUMNS: tuple[Column, ...] = (
    Column("format", "left", lambda key, entry, batch: key),
    Column("status", "left", lambda key, entry, batch: str(entry["status"])),
    Column("size MB", "right", lambda key, entry, batch: _size_mb(entry)),
    Column("top-1 %", "right", lambda key, entry, batch: _top1(entry)),
    Column("drop [95% CI]", "right", lambda key, entry, batch: _drop_interval(entry)),
    Column("agree %", "right", lambda key, entry, batch: _agreement(entry)),
    Column("p50 ms @1", "right", lambda key, entry, batch: _p50_at_one(entry)),
    Column("img/s @{batch}", "right", lambda key, entry, batch: _throughput_at(entry, batch)),
)


def final_table(report: Mapping[str, Any], columns: Sequence[Column] | None = None) -> Table:
    """The final table: one row per format, the `columns` (a task's own, benchmarks.report.tasks;
    None: FINAL_TABLE_COLUMNS)."""
    columns = FINAL_TABLE_COLUMNS if columns is None else columns
    batch = largest_batch(report)
    return Table(
        header=tuple(column.header.format(batch=batch or "-") for column in columns),
        rows=tuple(
            tuple(column.cell(key, entry, batch) for column in columns)
            for key, entry in format_entries(report).items()
        ),
        align=tuple(column.align for column in columns),
        status_column=1,
    )


def _format_notes(report: Mapping[str, Any]) -> tuple[str, ...]:
    """What the accuracy columns were measured on, why each format that is not ok is not, drops
    that were refused, and the failed gates."""
    validation = report.get("validation", {})
    notes = []
    if validation.get("source_text"):
        source, reference = validation["source_text"], validation.get("reference")
        notes.append(f"accuracy measured on {source}, against {reference}")
    for key, entry in format_entries(report).items():
        if entry["status"] != Status.OK and entry.get("reason"):
            notes.append(f"{key}: {entry['status']}: {entry['reason']}")
        refused = (entry.get("accuracy") or {}).get("drop_refused")
        if refused:
            notes.append(f"{key}: {refused}")
    machines: dict[str, list[str]] = {}
    for key, entry in format_entries(report).items():
        if entry.get("latency"):
            machines.setdefault(_machine(entry), []).append(key)
    if len(machines) > 1:
        timed = "; ".join(f"{', '.join(keys)} on {machine}" for machine, keys in machines.items())
        notes.append(f"latency timed on different machines: {timed}")
    if validation.get("passed") is False:
        notes.append("validation FAILED: " + "; ".join(validation.get("failures", [])))
    return tuple(notes)


# ----------------------------------------------------------------------------- the other parts


def headline(report: Mapping[str, Any]) -> str:
    """One line: the student's gain in the task's ranking metric over the run's baseline student (no
    teacher), or why there is none."""
    gain = report.get("distillation") or {}
    if gain.get("status") != Status.OK:
        reason = gain.get("reason") or "report.json has no distillation block (written by an older version)"
        return f"distillation gain: not measured: {reason}"
    metric = str(gain["metric_label"]).removesuffix(" %")
    return (
        f"distillation gain: {gain['gain_points']:+.2f} {metric} points, {gain['method']} "
        f"{gain['student_score']:.2f}% vs {gain['baseline_label']} {gain['baseline_score']:.2f}%"
        " (same run, best epochs)"
    )


def _run_lines(report: Mapping[str, Any]) -> tuple[str, ...]:
    run = report.get("run", {})
    student, teacher = run.get("student", {}), run.get("teacher", {})
    # Each model's score in the task's ranking metric (top-1, mAP).
    metric, label = run.get("metric"), str(run.get("metric_label") or "-").removesuffix(" %")
    lines = [
        f"method: {run.get('method') or '-'}",
        f"student: {student.get('arch') or '-'} ({label} {number_text(student.get('score'))})",
        f"teacher: {teacher.get('arch') or '-'} ({label} {number_text(teacher.get('score'))})",
        f"dataset: {run.get('dataset') or '-'}, classes: {run.get('num_classes') or '-'}, "
        f"input: {run.get('input_shape') or '-'}, epochs logged: {run.get('epochs', 0)}",
    ]
    for name, base in (run.get("baselines") or {}).items():
        score = base.get(metric) if isinstance(base, Mapping) else base
        lines.append(f"baseline {name}: {label} {number_text(score)}")
    return tuple(lines)


def _stage_note(report: Mapping[str, Any], block: str) -> str | None:
    value = report.get(block, {})
    return value.get("reason") if value.get("status") == Status.NOT_MEASURED else None


def _accuracy_rows(report: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(format, what it was measured on, entry) for the primary measurement's formats, then for each
    other measurement's (its drops are against its own reference, on its own images). A format
    with no accuracy was measured on nothing: its source is "-"."""
    validation = report.get("validation", {})

    def row(key: str, source: object, entry: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any]]:
        return key, str(source) if entry.get("accuracy") and source else "-", entry

    rows = [row(key, validation.get("source_text"), entry) for key, entry in format_entries(report).items()]
    for other in validation.get("other_measurements") or []:
        source, reference = other.get("source_text"), other.get("reference")
        for key, entry in other.get("results", {}).items():
            rows.append(row(key, source, {**entry, "reference": key == reference}))
    return rows


def gate_text(entry: Mapping[str, Any]) -> str:
    """A format's gates and their verdicts, "name verdict, ..."; "-" for none."""
    shown = []
    for gate in entry.get("gates") or []:
        verdict = gate.get("verdict") or ("pass" if gate["passed"] else "FAIL")
        shown.append(f"{gate['gate']} {verdict}")
    return ", ".join(shown) or "-"


def _accuracy_table(report: Mapping[str, Any]) -> Table:
    header = (
        "format",
        "measured on",
        "top-1 %",
        "drop [95% CI]",
        "top-5 %",
        "n",
        "max |diff|",
        "mean |diff|",
        "agree %",
        "gates",
    )
    rows = []
    for key, source, entry in _accuracy_rows(report):
        acc = entry.get("accuracy") or {}
        par = entry.get("parity") or {}
        rows.append(
            (
                key,
                source,
                number_text(acc.get("top1")),
                _drop_interval(entry),
                number_text(acc.get("top5")),
                str(acc.get("n", "-")),
                "-" if par.get("max_abs_diff") is None else f"{par['max_abs_diff']:.3g}",
                "-" if par.get("mean_abs_diff") is None else f"{par['mean_abs_diff']:.3g}",
                number_text(par.get("top1_agreement")),
                gate_text(entry),
            )
        )
    return Table(header, tuple(rows), ("left", "left", *(RIGHT for _ in header[2:-1]), "left"))


def _machine(entry: Mapping[str, Any]) -> str:
    """The machine a format was timed on, as bench recorded it."""
    return str((entry.get("bench") or {}).get("machine") or "-")


def _with_interval(stats: Mapping[str, Any], name: str) -> str:
    """A percentile with its bootstrap 95% interval, "1.234 [1.200-1.250]"; bare when not recorded."""
    value = number_text(stats.get(f"{name}_ms"), 3)
    interval = stats.get(f"{name}_ci_ms")
    if not interval:
        return value
    return f"{value} [{number_text(interval[0], 3)}-{number_text(interval[1], 3)}]"


def _latency_table(report: Mapping[str, Any]) -> Table:
    header = (
        "format",
        "machine",
        "batch",
        "warm-up",
        "n",
        "p50 ms [95% CI]",
        "p90 ms [95% CI]",
        "p99 ms [95% CI]",
        "mean ms",
        "std ms",
        "CV",
        "images/s",
        "other load",
        "mJ/image",
        "verdict",
    )
    rows = []
    for key, entry in format_entries(report).items():
        for batch in sorted(entry.get("latency", {}), key=int):
            stats = entry["latency"][batch]
            percentiles = (_with_interval(stats, name) for name in ("p50", "p90", "p99"))
            rows.append(
                (
                    key,
                    _machine(entry),
                    batch,
                    str(stats.get("warmup_iters", "-")),
                    str(stats.get("iters", "-")),
                    *percentiles,
                    number_text(stats.get("mean_ms"), 3),
                    number_text(stats.get("std_ms"), 3),
                    number_text(stats.get("cv"), 3),
                    number_text(stats.get("throughput_ips"), 1),
                    usage_text(stats["cpu_usage"]) if stats.get("cpu_usage") else "-",
                    _energy_cell(stats.get("energy")),
                    str(stats.get("verdict", "-")),
                )
            )
    return Table(header, tuple(rows), ("left", "left", *(RIGHT for _ in header[2:-1]), "left"))


def _energy_cell(energy: Any) -> str:
    """A measurement's total energy per image (mJ, above idle), or "-" where it was not measured."""
    total = energy.get("total_mj_per_image") if isinstance(energy, Mapping) else None
    return number_text(total, 3) if isinstance(total, int | float) else "-"


def _energy_notes(report: Mapping[str, Any]) -> list[str]:
    """Each metered measurement's energy per source, and each distinct reason energy was not measured."""
    notes: list[str] = []
    unmeasured: dict[str, list[str]] = {}
    for key, entry in format_entries(report).items():
        for batch in sorted(entry.get("latency", {}), key=int):
            energy = entry["latency"][batch].get("energy")
            if is_unknown(energy):
                unmeasured.setdefault(energy["unknown"], []).append(f"{key} batch {batch}")
            elif isinstance(energy, Mapping):
                sources = ", ".join(
                    f"{name} {number_text(value['mj_per_image'], 3)}"
                    f" (busy {number_text(value['busy_mw'], 0)} mW, idle {field_text(value['idle_mw'])})"
                    for name, value in energy["per_source"].items()
                )
                notes.append(
                    f"{key} batch {batch} energy per image, mJ above idle: total"
                    f" {field_text(energy['total_mj_per_image'])} ({energy['total_of']}); {sources}"
                )
    notes.extend(f"energy not measured for {', '.join(keys)}: {why}" for why, keys in unmeasured.items())
    return notes


def _latency_notes(report: Mapping[str, Any]) -> tuple[str, ...]:
    """Why each noisy measurement is noisy, each interleaved comparison's ratio and verdict, then
    the energy per image or why it was not measured."""
    notes = []
    for key, entry in format_entries(report).items():
        for batch in sorted(entry.get("latency", {}), key=int):
            why = entry["latency"][batch].get("noisy_because")
            if why:
                notes.append(f"{key} batch {batch} is noisy: {why}")
    for pair in (report.get("bench") or {}).get("comparisons", {}).values():
        for batch, c in pair.get("batches", {}).items():
            low, high = c["time_ratio_ci"]
            notes.append(
                f"{pair['a']} vs {pair['b']}, batch {batch}, interleaved: {c['verdict']}, time ratio"
                f" {number_text(c['time_ratio'], 3)} (95% CI {number_text(low, 3)}-{number_text(high, 3)},"
                f" {c['pairs']} pairs)"
            )
            for flag in [*c.get("machine_flags", []), *pair.get("machine_flags", [])]:
                notes.append(f"{pair['a']} vs {pair['b']}, batch {batch}, machine: {flag}")
        if pair.get("status") != Status.OK:
            notes.append(f"{pair['a']} vs {pair['b']}: {pair['status']}: {pair.get('reason')}")
    for key, entry in format_entries(report).items():
        for batch, summary in ((entry.get("bench") or {}).get("trt_breakdown") or {}).items():
            notes.append(f"{key} batch {batch}, TensorRT breakdown: {breakdown_text(summary)}")
    return (*notes, *_energy_notes(report))


# How the table's verdict is reached, said above it.
LATENCY_RULE = (
    f"Warm-up ends at a steady state (two windows of {STEADY_WINDOW} calls whose medians agree within"
    f" {STEADY_TOLERANCE:.0%}, at most {MAX_WARMUP_ITERS} calls or {MAX_WARMUP_SECONDS:g} s). Intervals are"
    f" bootstrap 95% intervals. A measurement is noisy when its CV exceeds {NOISY_CV:g}, p99/p50 exceeds"
    f" {NOISY_TAIL_RATIO:g}, it has fewer than {MIN_JUDGED_ITERS} timed calls or its warm-up found no"
    f" steady state, or when the machine's state undermines it (other processes above"
    f" {OTHER_CPU_SHARE_LIMIT:.0%} of the CPUs' time, a CPU governor other than performance, a throttled"
    f" GPU, a Jetson without jetson_clocks): {NOISY_ADVICE}. Other load is other processes' share of"
    " the CPUs' time during the timed calls; mJ/image is the energy per image above an idle baseline read"
    " just before, where this machine has power rails or energy counters."
)


def _environment_lines(report: Mapping[str, Any]) -> tuple[str, ...]:
    env = report.get("environment", {})
    cpu = env.get("cpu", {})
    gpu = env.get("gpu")
    libraries = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items() if v)
    return (
        f"recorded by: {env.get('source', '-')}",
        f"CPU: {cpu.get('model', '-')} "
        f"({cpu.get('usable_cores', '-')} usable of {cpu.get('logical_cores', '-')} cores)",
        f"GPU: {gpu.get('name') if gpu else 'none'}",
        f"threads: {json.dumps(env.get('threads', {}))}",
        f"python {env.get('python', '-')}; {libraries}",
        *_machine_state_lines(report),
    )


def _machine_state_lines(report: Mapping[str, Any]) -> list[str]:
    """Each timed format's machine state (benchmarks.machine_state), taken after its measurements,
    and its runtime's thread pools; formats with the same state share one line."""
    by_state: dict[tuple[str, ...], list[str]] = {}
    for key, entry in format_entries(report).items():
        bench = entry.get("bench") or {}
        if bench.get("machine_state"):
            lines = [*state_lines(bench["machine_state"]), f"threads {json.dumps(bench.get('threads'))}"]
            by_state.setdefault(tuple(lines), []).append(key)
    return [
        f"machine state for {', '.join(keys)}: {line}" for lines, keys in by_state.items() for line in lines
    ]


def _end_text(entry: Mapping[str, Any], key: str) -> str:
    """Each end output's relative L2 (`key`: marked_rel_l2 or deployed_rel_l2), named where there
    are several (a detector's head outputs)."""
    outputs = entry.get("end_outputs") or {}
    if len(outputs) == 1:
        return number_text(next(iter(outputs.values())).get(key), 4)
    return "; ".join(f"{name} {number_text(error.get(key), 4)}" for name, error in outputs.items()) or "-"


def _metric_text(metric: Mapping[str, Any] | None) -> str:
    """The task's metric of fp32 and the file, as deployed, and the drop; "-" where it has none."""
    if not metric:
        return "-"
    reference, candidate = number_text(metric.get("reference")), number_text(metric.get("candidate"))
    return f"{metric.get('label', '')} {reference} -> {candidate} (drop {number_text(metric.get('drop'))})"


def _layerwise_section(report: Mapping[str, Any], plots: Sequence[Plot]) -> Section | None:
    """Where each lower-precision file's error jumps, from `reviewkd layerwise`, with its plots: the
    end outputs' error (a classifier's logits, a detector's head outputs) and, where the task has
    one, its own metric as deployed (a detector's mAP)."""
    found = report.get("layerwise") or {}
    if not found:
        return None
    labels = sorted({str(entry.get("end_label") or "logits") for entry in found.values()})
    end = " / ".join(labels)
    header = ["format", "jump at module", "node", "rel. L2", "jump", f"{end} rel. L2 Q/DQ", "as deployed"]
    with_metric = any(entry.get("metric") for entry in found.values())
    if with_metric:
        header.append("metric as deployed: fp32 -> file")
    rows = []
    for fmt, entry in found.items():
        jump = entry.get("jump") or {}
        row = [
            f"onnxruntime/{fmt}",
            str(jump.get("module", "-")),
            str(jump.get("node", "-")),
            number_text(jump.get("rel_l2"), 4),
            number_text(jump.get("jump"), 4),
            _end_text(entry, "marked_rel_l2"),
            _end_text(entry, "deployed_rel_l2"),
        ]
        if with_metric:
            row.append(_metric_text(entry.get("metric")))
        rows.append(tuple(row))
    names = {entry.get("plot") for entry in found.values()}
    aligns: tuple[Align, ...] = ("left", "left", "left", RIGHT, RIGHT, RIGHT, RIGHT)
    if with_metric:
        aligns += ("left",)
    return Section(
        "Layer-wise parity (reviewkd layerwise)",
        note=(
            f"Each layer's output against fp32, in graph order, up to the {end}; the full tables are"
            " report/layerwise_*.md."
        ),
        table=Table(tuple(header), tuple(rows), aligns),
        plots=tuple(plot for plot in plots if plot.path.name in names),
    )


def _accuracy_section(report: Mapping[str, Any]) -> Section:
    """The accuracy table, titled with the reference it was measured against, and a note saying
    why that reference (without torch: the fp32 ONNX file) and on which images."""
    missing = _stage_note(report, "validation")
    if missing is not None:
        return Section("Accuracy and parity", note=missing)
    validation = report.get("validation", {})
    reference = validation.get("reference") or "-"
    lines = [f"Measured on {validation.get('source_text') or 'inputs not recorded'}."]
    if validation.get("reference_note"):
        lines.append(f"Reference: {validation['reference_note']}.")
    if validation.get("other_measurements"):
        lines.append("Rows of other measurements compare with their own reference, on their own images.")
    title = f"Accuracy and parity against {reference}"
    return Section(title, note=" ".join(lines), table=_accuracy_table(report))


def _plots_note(report: Mapping[str, Any], plots: Sequence[Plot]) -> str | None:
    if plots:
        return None
    return report.get("plots_note") or "Nothing to plot: no timings, accuracies or training records."


def build_document(
    report: Mapping[str, Any],
    plots: Sequence[Plot] = (),
    task_sections: Sequence[Section] = (),
    columns: Sequence[Column] | None = None,
    classifier_accuracy: bool = True,
) -> ReportDocument:
    """The document of report.json's content `report`, showing `plots` (already drawn), the final
    table's `columns` (None: FINAL_TABLE_COLUMNS) and, after the accuracy section (top-1 and logit
    parity; left out unless `classifier_accuracy`), the run's task's own sections."""
    latency_note = _stage_note(report, "bench")
    latency = _latency_table(report)
    if latency_note is None and not latency.rows:
        latency_note = "No format was timed."
    layerwise_plots = {entry.get("plot") for entry in (report.get("layerwise") or {}).values()}
    general = tuple(plot for plot in plots if plot.path.name not in layerwise_plots)
    return ReportDocument(
        title=TITLE,
        headline=headline(report),
        run=_run_lines(report),
        final_table=final_table(report, columns),
        format_notes=_format_notes(report),
        accuracy=_accuracy_section(report) if classifier_accuracy else None,
        latency=(
            Section("Latency", note=latency_note)
            if latency_note
            else Section("Latency", note=LATENCY_RULE, table=latency, bullets=_latency_notes(report))
        ),
        plots=Section("Plots", note=_plots_note(report, general), plots=general),
        environment=Section("Environment", bullets=_environment_lines(report)),
        layerwise=_layerwise_section(report, plots),
        task_sections=tuple(task_sections),
    )
