"""The run's report: report.json, report.md, a self-contained report.html with plots, and the
final table printed on the terminal.

Inputs, all inside the run directory: manifest.json (run information, file sizes, the
cross-entropy baseline), report/validate.json (`reviewkd validate`), report/bench.json
(`reviewkd bench`), and the metrics.jsonl of the student and of the baseline (training curves).

The parts, in the order the data flows:
    results    reading and writing the stage results and metrics.jsonl
    assemble   report.json's content (`build_report`)
    document   one typed document from that content: headline, run lines, tables, notes, plots
    markdown, html, terminal   its renderers; plots draws the PNGs; writer ties them together

report.json holds one entry per format keyed "<backend>/<precision>" (keys with a "/"), and the
blocks "schema_version", "run", "distillation", "validation", "bench", "environment" and "plots".
Each format entry:

    status        "ok", "failed", "skipped" or "not measured"; reason (None when ok); a file
                  exported from an earlier student is "failed", its reason starting "stale: "
    backend, precision, file, size_bytes, reference (whether it is the one compared with)
    accuracy      {top1, top5, n, top1_drop} in % (None: not measured); top1_drop is None, with
                  "drop_refused", where the format and the reference saw different image counts
    parity        {max_abs_diff, mean_abs_diff, top1_agreement, n} against the reference
    latency       {"<batch>": {p50_ms, p90_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms, iters,
                   throughput_ips}}
    gates         the validation gate checks
    validate, bench   each stage's own status and reason (plus device, timer, cuda_graphs,
                  skipped_batches for bench)

"distillation": {status, reason, method, metric (the task's ranking metric: "top1", "map"),
metric_label, student_score, baseline (the task's baseline method: "ce", "plain"), baseline_label,
baseline_score, baseline_run, gain_points}: the student's score minus the baseline student's, in
points.

"validation": the measurement the entries show (benchmarks.report.assemble picks it): reference,
reference_note, images, passed, failures, gates, source and source_text (what it measured), and
"other_measurements": the other measurements of the run's student, each {source, source_text,
reference, reference_note, images, passed, results: {key: {status, reason, accuracy, parity}}}.
"""

from benchmarks.report.assemble import REFERENCE_KEY, REPORT_SCHEMA_VERSION, build_report, format_entries
from benchmarks.report.document import FINAL_TABLE_COLUMNS, Column, ReportDocument, build_document
from benchmarks.report.results import (
    BENCH_FILE,
    METRICS_FILE,
    REPORT_DIR,
    VALIDATE_FILE,
    load_result,
    read_metrics,
    report_dir,
    save_result,
    saved_with_notes,
)
from benchmarks.report.terminal import format_final_table
from benchmarks.report.writer import PLOTS, write_report

__all__ = [
    "BENCH_FILE",
    "FINAL_TABLE_COLUMNS",
    "METRICS_FILE",
    "PLOTS",
    "REFERENCE_KEY",
    "REPORT_DIR",
    "REPORT_SCHEMA_VERSION",
    "VALIDATE_FILE",
    "Column",
    "ReportDocument",
    "build_document",
    "build_report",
    "format_entries",
    "format_final_table",
    "load_result",
    "read_metrics",
    "report_dir",
    "save_result",
    "saved_with_notes",
    "write_report",
]
