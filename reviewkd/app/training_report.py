"""The report of a run whose task has no deployment stages yet (deploy.tasks: deploy_skip_reason).

It says what training measured, in the task's own metrics (spec.model_metrics: detection's mAP and
AP50 on the val split): the teacher, the distilled student and the baseline student, and the
distillation gain in points of the ranking metric. Export, validate and bench appear as skipped,
with the task's reason, never as passed.

report/report.json:

    schema_version  REPORT_SCHEMA_VERSION
    task            the task's name
    metric          {"key", "label"}: the ranking metric
    models          [{"role": "teacher" | method name | baseline method, "arch", "run", <metric>: ...}]
    distillation    {"method", "student", "baseline", "baseline_value", "gain_points"}: the gain is
                    positive where the distilled student is the better (None where a side is
                    missing: no baseline trained)
    stages          {"export" | "validate" | "bench": {"status": "skipped", "reason"}}

report/report.md holds the same as a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy import run_layout
from deploy.fileio import write_json_atomic, write_text_atomic
from deploy.manifest import ModelBlock, method_block, model_block, read_manifest
from deploy.tasks import TaskSpec, task_of

REPORT_SCHEMA_VERSION = 1
SKIPPED_STAGES = ("export", "validate", "bench")


def _model_row(role: str, block: ModelBlock, run: str, spec: TaskSpec) -> dict[str, Any]:
    row: dict[str, Any] = {"role": role, "arch": block.arch, "run": run}
    row.update({key: block.reported_scores.get(key) for key, _ in spec.model_metrics})
    return row


def build_training_report(run: Path) -> dict[str, Any]:
    """report.json's content for `run` (its manifest, and its baseline's when one was trained)."""
    manifest = read_manifest(run)
    spec = task_of(manifest, str(run_layout.run_path(run, run_layout.MANIFEST)))
    method = method_block(manifest).name
    student = model_block(manifest, "student")
    models = [
        _model_row("teacher", model_block(manifest, "teacher"), run_layout.TEACHER_DIR, spec),
        _model_row(str(method), student, ".", spec),
    ]
    baseline_dir = run / run_layout.BASELINE_DIR
    baseline_value = None
    if run_layout.run_path(baseline_dir, run_layout.MANIFEST).is_file():
        baseline = model_block(read_manifest(baseline_dir), "student")
        models.append(_model_row(spec.baseline_method, baseline, run_layout.BASELINE_DIR, spec))
        baseline_value = baseline.reported_scores.get(spec.metric_key)
    student_value = student.reported_scores.get(spec.metric_key)
    gain = None
    if student_value is not None and baseline_value is not None:
        gain = student_value - baseline_value if spec.higher_is_better else baseline_value - student_value
    reason = spec.deploy_skip_reason or ""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "task": spec.name,
        "metric": {"key": spec.metric_key, "label": spec.metric_label},
        "models": models,
        "distillation": {
            "method": method,
            "student": student_value,
            "baseline": spec.baseline_method,
            "baseline_value": baseline_value,
            "gain_points": gain,
        },
        "stages": {
            stage: {"status": "skipped", "reason": reason}
            for stage in SKIPPED_STAGES
            if not spec.is_ready(stage)
        },
    }


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _columns(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    spec = task_of(report, "report.json")
    return list(spec.model_metrics)


def format_training_table(report: Mapping[str, Any]) -> str:
    """What `reviewkd run` prints for such a run: the gain line, one row per model, the skipped stages."""
    columns = _columns(report)
    distillation = report["distillation"]
    metric = report["metric"]["label"]
    headline = (
        f"{report['task']}: {distillation['method']} student {metric} {_number(distillation['student'])}"
    )
    if distillation["gain_points"] is not None:
        headline += (
            f" vs {distillation['baseline']} {_number(distillation['baseline_value'])}:"
            f" {distillation['gain_points']:+.2f} points"
        )
    header = f"{'model':<10} {'arch':<24}" + "".join(f" {label:>16}" for _, label in columns)
    rows = [
        f"{row['role']:<10} {row['arch'] or '-':<24}"
        + "".join(f" {_number(row[key]):>16}" for key, _ in columns)
        for row in report["models"]
    ]
    skipped = [f"{stage}: skipped ({entry['reason']})" for stage, entry in report["stages"].items()]
    return "\n".join([headline, header, *rows, *skipped])


def write_training_report(run: Path) -> dict[str, Any]:
    """Write report/report.json and report/report.md for `run`; return the report."""
    report = build_training_report(run)
    write_json_atomic(run_layout.run_path(run, run_layout.REPORT_JSON), report)
    columns = _columns(report)
    lines = [
        f"# {report['task']} run {run.name}",
        "",
        "| model | arch | run | " + " | ".join(label for _, label in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for row in report["models"]:
        values = " | ".join(_number(row[key]) for key, _ in columns)
        lines.append(f"| {row['role']} | {row['arch'] or '-'} | {row['run']} | {values} |")
    gain = report["distillation"]["gain_points"]
    if gain is not None:
        lines += ["", f"Distillation gain: {gain:+.2f} points of {report['metric']['label']}."]
    lines += ["", *(f"- {stage}: skipped ({entry['reason']})" for stage, entry in report["stages"].items())]
    write_text_atomic(run_layout.run_path(run, run_layout.REPORT_MARKDOWN), "\n".join(lines) + "\n")
    return report
