"""report.json's content: one entry per format from the manifest and the stage results, the run's
information, and the distillation gain over the run's cross-entropy baseline.

A missing input is reported as "not measured"; no number is made up. Results whose file changed
after they were measured (its sha256 differs from the manifest's) are "not measured" too, with the
reason, and so are results measured on another student than the run's. A file exported from
another student (retraining since) is "failed" as stale, as predict and triton refuse it.

A stage file can hold several measurements (benchmarks.measured: other images, another
reference). The format entries show one, the primary: the most images, then the PyTorch
reference, then the latest; the others are listed under "validation"."other_measurements", each
with its source. A drop is only shown where the format and the reference were measured on the
same number of images.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.environment import collect_environment
from benchmarks.measured import manifest_student_sha256, short_sha, source_text, student_of
from benchmarks.report.results import (
    BENCH_FILE,
    VALIDATE_FILE,
    PathLike,
    load_result,
    measurements,
    outdated_reason,
    read_metrics,
)
from benchmarks.targets import artifact_formats
from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import parse_json
from deploy.manifest import (
    Manifest,
    ModelBlock,
    data_block,
    input_spec,
    method_block,
    model_block,
    read_manifest,
)
from deploy.predict import check_export_is_current
from deploy.status import Status
from deploy.tasks import TaskSpec, task_of

# 2: "validation" names its source and other measurements; stale exports are failed.
REPORT_SCHEMA_VERSION = 2
REFERENCE_KEY = "torch/fp32"


def format_entries(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the report's per-format entries (the keys "<backend>/<precision>"), in order."""
    return {key: value for key, value in report.items() if "/" in key}


def _stale_reason(stage: str, entry: Mapping[str, Any], manifest: Manifest) -> str | None:
    file, sha = entry.get("file"), entry.get("sha256")
    if not file or not sha:
        return None
    recorded = manifest.get("artifacts", {}).get(file)
    if recorded is None:
        return f"{file} is no longer in the manifest; its {stage} results are stale"
    if recorded.get("sha256") != sha:
        return f"{file} changed after {stage} ran; run reviewkd {stage} again"
    return None


def _checked_drop(entry: dict[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """The entry, without a top-1 drop unless it and the result's reference saw as many images.

    validate computes every drop on one pass over the same images; an entry whose image count
    differs from its reference's came from another set, and a drop across sets means nothing.
    """
    accuracy = entry.get("accuracy")
    reference = result["results"].get(result.get("reference"))
    if not isinstance(accuracy, Mapping) or accuracy.get("top1_drop") is None:
        return entry
    reference_n = (reference or {}).get("accuracy", {}) or {}
    if reference_n.get("n") == accuracy.get("n"):
        return entry
    checked = {k: v for k, v in accuracy.items() if k not in ("top1_drop", "top1_drop_ci", "paired")}
    checked["top1_drop"] = None
    checked["drop_refused"] = (
        f"no drop: measured on {accuracy.get('n')} images, the reference {result.get('reference')}"
        f" on {reference_n.get('n', 'no')} images"
    )
    return {**entry, "accuracy": checked}


def _stage_view(
    stage: str, result: Mapping[str, Any] | None, key: str, manifest: Manifest
) -> dict[str, Any] | None:
    """Return a stage's entry for `key`, or None when the stage has no valid result for it."""
    if result is None:
        return None
    entry = result["results"].get(key)
    if entry is None or _stale_reason(stage, entry, manifest) is not None:
        return None
    return _checked_drop(dict(entry), result)


def _not_measured(
    stage: str, result: Mapping[str, Any] | None, key: str, manifest: Manifest, missing: str | None
) -> str:
    if result is None:
        return f"not measured: {missing}"
    entry = result["results"].get(key)
    if entry is None:
        return f"not measured: reviewkd {stage} did not include {key}"
    stale = _stale_reason(stage, entry, manifest)
    return f"not measured: {stale}"


def _stage_result(
    run_dir: PathLike, name: str, manifest: Manifest
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str | None]:
    """A stage file's primary measurement, its other measurements, and why there is none.

    Only measurements of the run's current student count; the primary is the one with the most
    images, then the one against the PyTorch student, then the latest.
    """
    stage = name.removesuffix(".json")
    data = load_result(run_dir, name)
    if data is None:
        return None, [], f"report/{name} is missing (run reviewkd {stage})"
    outdated = outdated_reason(data, name)
    if outdated is not None:
        return None, [], f"{outdated}; run reviewkd {stage} again"
    found = measurements(data)
    current = manifest_student_sha256(manifest)
    usable = [m for m in found if student_of(m) == current]
    if not usable:
        measured = student_of(found[-1]) if found else None
        return None, [], (
            f"report/{name} measured student {short_sha(measured)}, the run's student is now"
            f" {short_sha(current)}; run reviewkd {stage} again"
        )
    order = sorted(
        range(len(usable)),
        key=lambda i: (usable[i].get("images") or 0, usable[i].get("reference") == REFERENCE_KEY, i),
    )
    return usable[order[-1]], [usable[i] for i in reversed(order[:-1])], None


def _export_stale_reason(run_dir: PathLike, manifest: Manifest, file: str | None) -> str | None:
    """Why a format's file may not stand for the run's student (exported from another), or None."""
    if not file or file not in manifest.get("artifacts", {}) or file == run_layout.STUDENT_WEIGHTS:
        return None
    try:
        check_export_is_current(run_dir, manifest, file)
    except UsageError as exc:
        return f"stale: {exc}"
    return None


def _measurement_summary(result: Mapping[str, Any], manifest: Manifest) -> dict[str, Any]:
    """A validate measurement other than the primary, as the report lists it: its source, its
    reference and each format's status and accuracy (files changed since are left out)."""
    results = {}
    for key in result["results"]:
        view = _stage_view("validate", result, key, manifest)
        if view is not None:
            results[key] = {name: view.get(name) for name in ("status", "reason", "accuracy", "parity")}
    return {
        "source": (result.get("measured") or {}).get("source"),
        "source_text": source_text(result),
        "reference": result.get("reference"),
        "reference_note": result.get("reference_note"),
        "images": result.get("images"),
        "passed": result.get("passed"),
        "results": results,
    }


def _combine(stages: Mapping[str, Mapping[str, Any]]) -> tuple[str, str | None]:
    """Overall status of a format from its stages: any failure fails it; all skipped skips it."""
    statuses = {name: s["status"] for name, s in stages.items() if s["status"] != Status.NOT_MEASURED}
    # Stages that give the same reason (a missing runtime stops both) are named together.
    by_reason: dict[str, list[str]] = {}
    for name, stage in stages.items():
        if stage["status"] != Status.OK and stage["reason"]:
            by_reason.setdefault(stage["reason"], []).append(name)
    reason = "; ".join(f"{', '.join(names)}: {text}" for text, names in by_reason.items()) or None
    if not statuses:
        return Status.NOT_MEASURED, reason
    if Status.FAILED in statuses.values():
        status = Status.FAILED
    elif all(value == Status.SKIPPED for value in statuses.values()):
        status = Status.SKIPPED
    else:
        status = Status.OK
    return status, reason


def _format_keys(
    manifest: Manifest, validate: Mapping[str, Any] | None, bench: Mapping[str, Any] | None
) -> list[str]:
    keys: dict[str, None] = {REFERENCE_KEY: None}
    for result in (validate, bench):
        if result is not None:
            keys.update(dict.fromkeys(result["results"]))
    keys.update(dict.fromkeys(artifact_formats(manifest)))
    return list(keys)


def _static_fields(key: str, manifest: Manifest, views: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """backend, precision, file and size_bytes: from a stage's entry, else from the manifest."""
    for view in views:
        if view is not None:
            return {name: view.get(name) for name in ("backend", "precision", "file", "size_bytes")}
    backend, _, label = key.partition("/")
    formats = artifact_formats(manifest)
    if key in formats:
        relpath, entry = formats[key]
        return {
            "backend": backend,
            "precision": entry.get("precision", label),
            "file": relpath,
            "size_bytes": entry.get("size_bytes"),
        }
    weights = manifest.get("artifacts", {}).get(run_layout.STUDENT_WEIGHTS)
    if key.startswith("torch/") and weights:
        return {
            "backend": backend,
            "precision": label,
            "file": run_layout.STUDENT_WEIGHTS,
            "size_bytes": weights.get("size_bytes"),
        }
    return {"backend": backend, "precision": label, "file": None, "size_bytes": None}


def _run_info(
    run_dir: PathLike, manifest: Manifest, metrics: Sequence[Mapping[str, Any]], task: TaskSpec
) -> dict[str, Any]:
    student, teacher = model_block(manifest, "student"), model_block(manifest, "teacher")
    method = method_block(manifest)
    return {
        "dir": str(Path(run_dir).resolve()),
        "method": method.name,
        "method_params": dict(method.params),
        # The task's ranking metric ("top1", "map"), which each model's "score" is.
        "metric": task.metric_key,
        "metric_label": task.metric_label,
        "student": {
            "arch": student.arch,
            "top1": student.reported_scores.get("top1"),
            "top5": student.reported_scores.get("top5"),
            "score": student.reported_scores.get(task.metric_key),
        },
        "teacher": {
            "arch": teacher.arch,
            "top1": teacher.reported_scores.get("top1"),
            "top5": teacher.reported_scores.get("top5"),
            "score": teacher.reported_scores.get(task.metric_key),
        },
        "baselines": manifest.get("baselines"),
        "classes": list(manifest.get("classes") or []),
        "num_classes": len(manifest.get("classes", [])) or student.num_classes,
        "input_shape": list(input_spec(manifest).shape) if manifest.get("input") else None,
        "dataset": data_block(manifest).dataset,
        "epochs": len(metrics),
    }


def _distillation(manifest: Manifest, task: TaskSpec) -> dict[str, Any]:
    """The student's gain in the task's ranking metric (top-1, mAP) over the baseline student (the
    task's baseline method: no teacher) trained in the same run, in points.

    Both values are the manifest's for each student's best validation epoch, on the same images:
    the test split's, scored once, where the run carved its validation split (data.val_split), else
    the validation split's. Without a baseline (`reviewkd run --no-baseline`, a plain `distill`)
    the block says so instead of a gain.
    """
    method = method_block(manifest).name
    metric, baseline_method, label = task.metric_key, task.baseline_method, task.baseline_label
    student_score = model_block(manifest, "student").reported_scores.get(metric)
    recorded = (manifest.get("baselines") or {}).get(baseline_method)
    baseline = (
        ModelBlock.from_dict(recorded, f"manifest: baselines.{baseline_method}").reported_scores
        if isinstance(recorded, Mapping)
        else None
    )
    block: dict[str, Any] = {
        "method": method,
        "metric": metric,
        "metric_label": task.metric_label,
        "student_score": student_score,
        "baseline": baseline_method,
        "baseline_label": label,
    }
    if method == baseline_method:
        reason = f"the student itself is the {label} student (method {method}); nothing was distilled"
    elif recorded is None or baseline is None:
        reason = f"this run has no {label} baseline (`reviewkd run` trains one unless --no-baseline)"
    elif student_score is None or (baseline_score := baseline.get(metric)) is None:
        reason = f"the student or the {label} baseline has no {metric} in the manifest"
    else:
        return {
            **block,
            "status": Status.OK,
            "reason": None,
            "baseline_score": baseline_score,
            "baseline_run": recorded.get("run"),
            "gain_points": student_score - baseline_score,
        }
    return {**block, "status": Status.NOT_MEASURED, "reason": reason}


LAYERWISE_GLOB = "layerwise_*.json"


def _layerwise(run_dir: PathLike) -> dict[str, Any]:
    """{format: summary} of the layer-wise parity reports `reviewkd layerwise` left in RUN/report."""
    found: dict[str, Any] = {}
    for path in sorted(run_layout.run_path(run_dir, run_layout.REPORT_DIR).glob(LAYERWISE_GLOB)):
        try:
            data = parse_json(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged side report must not stop the main one
        if not isinstance(data, dict):
            continue
        found[path.stem.removeprefix("layerwise_")] = {
            "images": data.get("images"),
            "jump": data.get("jump"),
            "end_label": data.get("end_label", "logits"),
            "end_outputs": _end_outputs(data),
            "metric": data.get("metric"),
            "layers": len(data.get("layers", [])),
            "plot": path.with_suffix(".png").name,
        }
    return found


def _end_outputs(data: Mapping[str, Any]) -> dict[str, Any]:
    """A layer-wise report's end outputs {tensor: {marked_rel_l2, deployed_rel_l2}}; a report
    written before detectors had them (a classifier's, keyed *_logits_rel_l2) gives its logits'."""
    if "end_outputs" in data or "marked_logits_rel_l2" not in data:
        return dict(data.get("end_outputs") or {})
    return {
        "logits": {
            "marked_rel_l2": data.get("marked_logits_rel_l2"),
            "deployed_rel_l2": data.get("deployed_logits_rel_l2"),
        }
    }


def build_report(run_dir: PathLike) -> dict[str, Any]:
    """Assemble report.json's content from the run's manifest, validate.json, bench.json and metrics."""
    manifest = read_manifest(run_dir)
    validate, other_validations, validate_missing = _stage_result(run_dir, VALIDATE_FILE, manifest)
    bench, _, bench_missing = _stage_result(run_dir, BENCH_FILE, manifest)
    metrics = read_metrics(run_dir)
    report: dict[str, Any] = {"schema_version": REPORT_SCHEMA_VERSION}
    report["generated_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    task = task_of(manifest, str(run_layout.run_path(run_dir, run_layout.MANIFEST)))
    report["task"] = task.name
    report["run"] = _run_info(run_dir, manifest, metrics, task)
    report["distillation"] = _distillation(manifest, task)
    report["layerwise"] = _layerwise(run_dir)
    # Without torch, validate compares with the fp32 ONNX file; the report marks what it compared with.
    reference = validate.get("reference", REFERENCE_KEY) if validate is not None else REFERENCE_KEY
    for key in _format_keys(manifest, validate, bench):
        v_view = _stage_view("validate", validate, key, manifest)
        b_view = _stage_view("bench", bench, key, manifest)
        entry = _static_fields(key, manifest, (v_view, b_view))
        stages: dict[str, dict[str, Any]] = {}
        if v_view is None:
            stages["validate"] = {
                "status": Status.NOT_MEASURED,
                "reason": _not_measured("validate", validate, key, manifest, validate_missing),
            }
        else:
            stages["validate"] = {"status": v_view["status"], "reason": v_view.get("reason")}
        if b_view is None:
            missing = _not_measured("bench", bench, key, manifest, bench_missing)
            stages["bench"] = {"status": Status.NOT_MEASURED, "reason": missing}
        else:
            stages["bench"] = {
                "status": b_view["status"],
                "reason": b_view.get("reason"),
                "device": b_view.get("device"),
                "timer": b_view.get("timer"),
                "cuda_graphs": b_view.get("cuda_graphs"),
                "skipped_batches": b_view.get("skipped_batches", {}),
                "machine": b_view.get("machine"),
                "machine_state": b_view.get("machine_state"),
                "threads": b_view.get("threads"),
                "trt_breakdown": b_view.get("trt_breakdown"),
            }
        status, reason = _combine(stages)
        stale = _export_stale_reason(run_dir, manifest, entry.get("file"))
        if stale is not None:
            # Whatever was measured of it, the file serves an older student: no numbers stand for this one.
            status, reason, v_view, b_view = Status.FAILED, stale, None, None
        report[key] = {
            "status": status,
            "reason": reason,
            **entry,
            "reference": key == reference,
            "accuracy": v_view.get("accuracy") if v_view else None,
            "parity": v_view.get("parity") if v_view else None,
            "latency": dict(b_view.get("latency", {})) if b_view else {},
            "gates": list(v_view.get("gates", [])) if v_view else [],
            **stages,
        }
    report["validation"] = (
        {
            **{
                key: validate.get(key)
                for key in ("reference", "reference_note", "images", "passed", "failures", "gates")
            },
            "source": (validate.get("measured") or {}).get("source"),
            "source_text": source_text(validate),
            # A detection run's example detections per model, drawn as the report's example grid.
            "examples": validate.get("examples"),
            "other_measurements": [_measurement_summary(m, manifest) for m in other_validations],
        }
        if validate is not None
        else {"status": Status.NOT_MEASURED, "reason": validate_missing}
    )
    report["bench"] = (
        {
            "settings": bench.get("settings", {}),
            "source_text": source_text(bench),
            "comparisons": bench.get("comparisons") or {},
        }
        if bench is not None
        else {"status": Status.NOT_MEASURED, "reason": bench_missing}
    )
    if bench is not None and bench.get("environment"):
        report["environment"] = {**bench["environment"], "source": "bench"}
    elif validate is not None and validate.get("environment"):
        report["environment"] = {**validate["environment"], "source": "validate"}
    else:
        # Nothing was measured: describe the machine writing the report, and say so.
        report["environment"] = {**collect_environment(), "source": "report"}
    return report
