"""The run's report: report.json, report.md, a self-contained report.html with plots, and the
final table printed on the terminal.

Inputs, all inside the run directory: manifest.json (run information, file sizes),
report/validate.json (`reviewkd validate`), report/bench.json (`reviewkd bench`) and
metrics.jsonl (training curves). A missing input is reported as "not measured"; no number is
made up. Results whose file changed after they were measured (its sha256 differs from the
manifest's) are "not measured" too, with the reason.

report.json holds one entry per format keyed "<backend>/<precision>" (keys with a "/"), and the
blocks "schema_version", "run", "validation", "bench" and "environment". Each format entry:

    status        "ok", "failed", "skipped" or "not measured"; reason (None when ok)
    backend, precision, file, size_bytes
    accuracy      {top1, top5, n, top1_drop} in % (None: not measured)
    parity        {max_abs_diff, mean_abs_diff, top1_agreement, n} against torch/fp32
    latency       {"<batch>": {p50_ms, p90_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms, iters,
                   throughput_ips}}
    gates         the validation gate checks
    validate, bench   each stage's own status and reason (plus device, timer, cuda_graphs,
                  skipped_batches for bench)
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.environment import collect_environment
from benchmarks.targets import artifact_formats
from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import atomic_output, write_json_atomic, write_text_atomic
from deploy.manifest import Manifest, forget_artifact, read_manifest, record_artifact, write_manifest
from deploy.status import Status

REPORT_SCHEMA_VERSION = 1
REPORT_DIR = run_layout.REPORT_DIR
VALIDATE_FILE = run_layout.VALIDATE_FILE
BENCH_FILE = run_layout.BENCH_FILE
METRICS_FILE = run_layout.METRICS
REFERENCE_KEY = "torch/fp32"
PLOTS: tuple[str, ...] = ("latency.png", "accuracy_size.png", "training.png")

PathLike = str | os.PathLike[str]


def report_dir(run_dir: PathLike) -> Path:
    """Return RUN/report."""
    return Path(run_dir) / REPORT_DIR


def _record(run_dir: PathLike, paths: Sequence[Path], removed: Sequence[Path] = ()) -> None:
    """Add report files to the manifest (kind "report"), so a resumed pipeline can verify them."""
    manifest = read_manifest(run_dir)
    root = Path(run_dir)
    for path in paths:
        record_artifact(run_dir, manifest, path.relative_to(root).as_posix(), "report")
    for path in removed:
        forget_artifact(manifest, path.relative_to(root).as_posix())
    write_manifest(run_dir, manifest)


def save_result(run_dir: PathLike, name: str, data: Mapping[str, Any]) -> Path:
    """Write a stage's result (VALIDATE_FILE or BENCH_FILE) to RUN/report atomically and record it."""
    path = report_dir(run_dir) / name
    write_json_atomic(path, data)
    _record(run_dir, [path])
    return path


def load_result(run_dir: PathLike, name: str) -> dict[str, Any] | None:
    """Read RUN/report/<name>; None when it does not exist, UsageError when it is not valid JSON."""
    path = report_dir(run_dir) / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not readable JSON ({exc}); run the stage that writes it again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UsageError(f"{path}: no 'results' object; run the stage that writes it again")
    return data


def read_metrics(run_dir: PathLike) -> list[dict[str, Any]]:
    """Return the per-epoch records of RUN/metrics.jsonl ([] when absent); bad lines are skipped.

    A run killed mid-write can leave a torn last line; the curves should still be drawn.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int | float):
            records.append(record)
    return records


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


def _stage_view(
    stage: str, result: Mapping[str, Any] | None, key: str, manifest: Manifest
) -> dict[str, Any] | None:
    """Return a stage's entry for `key`, or None when the stage has no valid result for it."""
    if result is None:
        return None
    entry = result["results"].get(key)
    if entry is None or _stale_reason(stage, entry, manifest) is not None:
        return None
    return dict(entry)


def _not_measured(stage: str, result: Mapping[str, Any] | None, key: str, manifest: Manifest) -> str:
    if result is None:
        return f"not measured: report/{stage}.json is missing (run reviewkd {stage})"
    entry = result["results"].get(key)
    if entry is None:
        return f"not measured: reviewkd {stage} did not include {key}"
    stale = _stale_reason(stage, entry, manifest)
    return f"not measured: {stale}"


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


def _run_info(run_dir: PathLike, manifest: Manifest, metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    student = manifest.get("student", {})
    teacher = manifest.get("teacher", {})
    method = manifest.get("method", {})
    return {
        "dir": str(Path(run_dir).resolve()),
        "method": method.get("name"),
        "method_params": method.get("params", {}),
        "student": {"arch": student.get("arch"), "top1": student.get("top1"), "top5": student.get("top5")},
        "teacher": {"arch": teacher.get("arch"), "top1": teacher.get("top1"), "top5": teacher.get("top5")},
        "baselines": manifest.get("baselines"),
        "num_classes": len(manifest.get("classes", [])) or student.get("num_classes"),
        "input_shape": manifest.get("input", {}).get("shape"),
        "dataset": manifest.get("data", {}).get("dataset"),
        "epochs": len(metrics),
    }


def build_report(run_dir: PathLike) -> dict[str, Any]:
    """Assemble report.json's content from the run's manifest, validate.json, bench.json and metrics."""
    manifest = read_manifest(run_dir)
    validate = load_result(run_dir, VALIDATE_FILE)
    bench = load_result(run_dir, BENCH_FILE)
    metrics = read_metrics(run_dir)
    report: dict[str, Any] = {"schema_version": REPORT_SCHEMA_VERSION}
    report["generated_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report["run"] = _run_info(run_dir, manifest, metrics)
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
                "reason": _not_measured("validate", validate, key, manifest),
            }
        else:
            stages["validate"] = {"status": v_view["status"], "reason": v_view.get("reason")}
        if b_view is None:
            missing = _not_measured("bench", bench, key, manifest)
            stages["bench"] = {"status": Status.NOT_MEASURED, "reason": missing}
        else:
            stages["bench"] = {
                "status": b_view["status"],
                "reason": b_view.get("reason"),
                "device": b_view.get("device"),
                "timer": b_view.get("timer"),
                "cuda_graphs": b_view.get("cuda_graphs"),
                "skipped_batches": b_view.get("skipped_batches", {}),
            }
        status, reason = _combine(stages)
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
            key: validate.get(key)
            for key in ("reference", "reference_note", "images", "passed", "failures", "gates")
        }
        if validate is not None
        else {
            "status": Status.NOT_MEASURED,
            "reason": f"{run_layout.VALIDATE_RESULT} is missing (run reviewkd validate)",
        }
    )
    report["bench"] = (
        {"settings": bench.get("settings", {})}
        if bench is not None
        else {
            "status": Status.NOT_MEASURED,
            "reason": f"{run_layout.BENCH_RESULT} is missing (run reviewkd bench)",
        }
    )
    if bench is not None and bench.get("environment"):
        report["environment"] = {**bench["environment"], "source": "bench"}
    elif validate is not None and validate.get("environment"):
        report["environment"] = {**validate["environment"], "source": "validate"}
    else:
        # Nothing was measured: describe the machine writing the report, and say so.
        report["environment"] = {**collect_environment(), "source": "report"}
    return report


# ----------------------------------------------------------------------------- numbers as text


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def _size_mb(entry: Mapping[str, Any]) -> str:
    size = entry.get("size_bytes")
    return "-" if size is None else _mb_text(size / 1e6)


def _mb_text(megabytes: float) -> str:
    # Two decimals hide a small model's file entirely; below 0.1 MB keep three significant digits.
    return f"{megabytes:.2f}" if megabytes >= 0.1 else f"{megabytes:.3g}"


def largest_batch(report: Mapping[str, Any]) -> int | None:
    """Return the largest batch size any format was timed at (None when nothing was timed)."""
    sizes = [int(b) for entry in format_entries(report).values() for b in entry.get("latency", {})]
    return max(sizes) if sizes else None


def _throughput_at(entry: Mapping[str, Any], batch: int | None) -> str:
    latency = entry.get("latency", {})
    if not latency or batch is None:
        return "-"
    if str(batch) in latency:
        return _num(latency[str(batch)]["throughput_ips"], 0)
    # Engines with a smaller batch profile: show their largest, labelled.
    own = max(int(b) for b in latency)
    return f"{_num(latency[str(own)]['throughput_ips'], 0)} (@{own})"


def _p50_at_one(entry: Mapping[str, Any]) -> str:
    stats = entry.get("latency", {}).get("1")
    return "-" if stats is None else _num(stats["p50_ms"], 3)


def table_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Return the final table's header and rows: one row per format."""
    batch = largest_batch(report)
    header = ["format", "status", "size MB", "top-1 %", "agree %", "p50 ms @1", f"img/s @{batch or '-'}"]
    rows = []
    for key, entry in format_entries(report).items():
        accuracy = entry.get("accuracy") or {}
        parity = entry.get("parity") or {}
        agreement = "ref" if entry.get("reference") and accuracy else _num(parity.get("top1_agreement"))
        rows.append(
            [
                key,
                entry["status"],
                _size_mb(entry),
                _num(accuracy.get("top1")),
                agreement,
                _p50_at_one(entry),
                _throughput_at(entry, batch),
            ]
        )
    return header, rows


def format_final_table(report: Mapping[str, Any]) -> str:
    """Return the terminal table (format, status, size, top-1, agreement, p50 @1, img/s @largest),
    followed by one line per format that is not ok, giving the reason."""
    header, rows = table_rows(report)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for key, entry in format_entries(report).items():
        if entry["status"] != Status.OK and entry.get("reason"):
            lines.append(f"{key}: {entry['status']}: {entry['reason']}")
    validation = report.get("validation", {})
    if validation.get("passed") is False:
        lines.append("validation FAILED: " + "; ".join(validation.get("failures", [])))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Any:
    # The object API with an explicit Agg canvas: no pyplot, so no global backend switch and no
    # display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Any, path: Path) -> Path:
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def plot_latency(report: Mapping[str, Any], path: Path) -> Path | None:
    """p50 latency and throughput against batch size, one line per format; None if nothing was timed."""
    series = {key: e["latency"] for key, e in format_entries(report).items() if e.get("latency")}
    if not series:
        return None
    figure = _new_figure(10, 4)
    ax_lat, ax_tp = figure.subplots(1, 2)
    for key, latency in series.items():
        sizes = sorted(int(b) for b in latency)
        ax_lat.plot(sizes, [latency[str(b)]["p50_ms"] for b in sizes], marker="o", label=key)
        ax_tp.plot(sizes, [latency[str(b)]["throughput_ips"] for b in sizes], marker="o", label=key)
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
    return _save_png(figure, path)


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
    figure = _new_figure(10, max(2.5, 0.45 * len(entries) + 1.2))
    ax_acc, ax_size = figure.subplots(1, 2)
    for ax, values, label in ((ax_acc, top1, "top-1 (%)"), (ax_size, size, "size (MB)")):
        if values:
            bars = ax.barh(list(values), list(values.values()), color="#4c72b0")
            ax.bar_label(bars, labels=[_mb_text(v) if ax is ax_size else f"{v:.2f}" for v in values.values()])
            ax.invert_yaxis()
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
    if top1:
        low = min(top1.values())
        ax_acc.set_xlim(max(0.0, low - 5.0), 100.0)
    ax_acc.set_title("Accuracy per format")
    ax_size.set_title("File size per format")
    return _save_png(figure, path)


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
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(10, 4)
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
    return _save_png(figure, path)


# ----------------------------------------------------------------------------- markdown and html


def _stage_note(report: Mapping[str, Any], block: str) -> str | None:
    value = report.get(block, {})
    return value.get("reason") if value.get("status") == Status.NOT_MEASURED else None


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    cells = [[cell.replace("|", "\\|") for cell in row] for row in [header, *rows]]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return lines


def _detail_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["format", "top-1 %", "top-5 %", "n", "max |diff|", "mean |diff|", "agree %", "gates"]
    rows = []
    for key, entry in format_entries(report).items():
        acc = entry.get("accuracy") or {}
        par = entry.get("parity") or {}
        gates = entry.get("gates", [])
        gate_text = (
            "-" if not gates else ", ".join(f"{g['gate']} {'pass' if g['passed'] else 'FAIL'}" for g in gates)
        )
        rows.append(
            [
                key,
                _num(acc.get("top1")),
                _num(acc.get("top5")),
                str(acc.get("n", "-")),
                "-" if par.get("max_abs_diff") is None else f"{par['max_abs_diff']:.3g}",
                "-" if par.get("mean_abs_diff") is None else f"{par['mean_abs_diff']:.3g}",
                _num(par.get("top1_agreement")),
                gate_text,
            ]
        )
    return header, rows


def _latency_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["format", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "images/s"]
    rows = []
    for key, entry in format_entries(report).items():
        for batch in sorted(entry.get("latency", {}), key=int):
            s = entry["latency"][batch]
            rows.append(
                [
                    key,
                    batch,
                    *(_num(s[f], 3) for f in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")),
                    _num(s["throughput_ips"], 1),
                ]
            )
    return header, rows


def _run_lines(report: Mapping[str, Any]) -> list[str]:
    run = report.get("run", {})
    student, teacher = run.get("student", {}), run.get("teacher", {})
    lines = [
        f"method: {run.get('method') or '-'}",
        f"student: {student.get('arch') or '-'} (top-1 {_num(student.get('top1'))})",
        f"teacher: {teacher.get('arch') or '-'} (top-1 {_num(teacher.get('top1'))})",
        f"dataset: {run.get('dataset') or '-'}, classes: {run.get('num_classes') or '-'}, "
        f"input: {run.get('input_shape') or '-'}, epochs logged: {run.get('epochs', 0)}",
    ]
    for name, base in (run.get("baselines") or {}).items():
        top1 = base.get("top1") if isinstance(base, Mapping) else base
        lines.append(f"baseline {name}: top-1 {_num(top1)}")
    return lines


def _environment_lines(report: Mapping[str, Any]) -> list[str]:
    env = report.get("environment", {})
    cpu = env.get("cpu", {})
    gpu = env.get("gpu")
    libraries = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items() if v)
    return [
        f"recorded by: {env.get('source', '-')}",
        f"CPU: {cpu.get('model', '-')} "
        f"({cpu.get('usable_cores', '-')} usable of {cpu.get('logical_cores', '-')} cores)",
        f"GPU: {gpu.get('name') if gpu else 'none'}",
        f"threads: {json.dumps(env.get('threads', {}))}",
        f"python {env.get('python', '-')}; {libraries}",
    ]


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, Path]) -> str:
    """Return report.md: run summary, the final table, accuracy/parity, latency, environment."""
    out = ["# reviewkd report", ""]
    out += [f"- {line}" for line in _run_lines(report)] + [""]
    out += ["## Formats", "", *_markdown_table(*table_rows(report)), ""]
    notes = [
        f"- {key}: {e['status']}: {e['reason']}"
        for key, e in format_entries(report).items()
        if e["status"] != Status.OK and e.get("reason")
    ]
    out += notes + ([""] if notes else [])
    out += ["## Accuracy and parity against torch/fp32", ""]
    note = _stage_note(report, "validation")
    out += [note, ""] if note else [*_markdown_table(*_detail_rows(report)), ""]
    out += ["## Latency", ""]
    note = _stage_note(report, "bench")
    header, rows = _latency_rows(report)
    out += (
        [note, ""] if note else (_markdown_table(header, rows) if rows else ["No format was timed."]) + [""]
    )
    out += ["## Environment", ""] + [f"- {line}" for line in _environment_lines(report)] + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots.items()] + [""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222}
body{max-width:1100px}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.ok{color:#1a7f37}.failed{color:#cf222e;font-weight:bold}.skipped{color:#9a6700}.not-measured{color:#777}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{color:#555}
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], status_col: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = f' class="{cell.replace(" ", "-")}"' if i == status_col else ""
            cells.append(f"<td{cls}>{html.escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: Mapping[str, Any], plots: Mapping[str, Path]) -> str:
    """Return report.html: the markdown's content, with every plot embedded as a base64 PNG."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>reviewkd report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>reviewkd report</h1>",
    ]
    parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in _run_lines(report)) + "</ul>")
    parts.append("<h2>Formats</h2>" + _html_table(*table_rows(report), status_col=1))
    notes = [
        f"{key}: {e['status']}: {e['reason']}"
        for key, e in format_entries(report).items()
        if e["status"] != Status.OK and e.get("reason")
    ]
    if notes:
        parts.append('<ul class="note">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Accuracy and parity against torch/fp32</h2>")
    note = _stage_note(report, "validation")
    parts.append(f'<p class="note">{html.escape(note)}</p>' if note else _html_table(*_detail_rows(report)))
    parts.append("<h2>Latency</h2>")
    note = _stage_note(report, "bench")
    header, rows = _latency_rows(report)
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    else:
        parts.append(_html_table(header, rows) if rows else '<p class="note">No format was timed.</p>')
    parts.append("<h2>Plots</h2>")
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></figure>')
    if not plots:
        parts.append('<p class="note">Nothing to plot: no timings, accuracies or training records.</p>')
    parts.append("<h2>Environment</h2>")
    parts.append(
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in _environment_lines(report)) + "</ul>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: PathLike) -> dict[str, Any]:
    """Build the report and write RUN/report/report.json, report.md, report.html and the PNGs.

    Returns the report (report.json's content). Plots without data are not drawn (an old PNG
    of that name is removed, so the folder never shows a stale picture). Every written file is
    recorded in the manifest with kind "report".
    """
    report = build_report(run_dir)
    out = report_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = {
        "latency vs batch size": plot_latency(report, out / PLOTS[0]),
        "accuracy and size per format": plot_accuracy_size(report, out / PLOTS[1]),
        "training curves": plot_training(read_metrics(run_dir), out / PLOTS[2]),
    }
    plots = {name: path for name, path in drawn.items() if path is not None}
    stale = [out / name for name in PLOTS if out / name not in plots.values()]
    for path in stale:
        path.unlink(missing_ok=True)
    report["plots"] = [path.name for path in plots.values()]
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report, plots))
    write_text_atomic(out / "report.html", render_html(report, plots))
    _record(run_dir, [out / "report.json", out / "report.md", out / "report.html", *plots.values()], stale)
    return report
