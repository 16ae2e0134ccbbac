"""The report's inputs inside a run directory: the stage results in RUN/report and metrics.jsonl."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.validate import describe_failures
from deploy import run_layout
from deploy.errors import OutputError, UsageError
from deploy.fileio import write_json_atomic
from deploy.manifest import forget_artifact, read_manifest, record_artifact, write_manifest

REPORT_DIR = run_layout.REPORT_DIR
VALIDATE_FILE = run_layout.VALIDATE_FILE
BENCH_FILE = run_layout.BENCH_FILE
METRICS_FILE = run_layout.METRICS

PathLike = str | os.PathLike[str]


def report_dir(run_dir: PathLike) -> Path:
    """Return RUN/report."""
    return Path(run_dir) / REPORT_DIR


def record_report_files(run_dir: PathLike, paths: Sequence[Path], removed: Sequence[Path] = ()) -> None:
    """Add report files to the manifest (kind "report"), so a resumed pipeline can verify them;
    forget the `removed` ones."""
    manifest = read_manifest(run_dir)
    root = Path(run_dir)
    for path in paths:
        record_artifact(run_dir, manifest, path.relative_to(root).as_posix(), "report")
    for path in removed:
        forget_artifact(manifest, path.relative_to(root).as_posix())
    write_manifest(run_dir, manifest)


def merge_results(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's new result over its previous one: formats measured now replace their old entries,
    formats not measured now keep theirs (listed under "kept_from_earlier").

    A run validated or benched for a subset of formats (onnxruntime on a laptop, tensorrt on the
    GPU host) thus keeps the other formats' numbers; each entry carries the sha256 of the file it
    measured, so the report still marks an entry whose file changed since. A validate result's
    "passed" and "failures" are recomputed over every entry kept.
    """
    merged = dict(new)
    if previous is None:
        return merged
    kept = [key for key in previous["results"] if key not in new["results"]]
    merged["results"] = {**previous["results"], **new["results"]}
    merged["kept_from_earlier"] = kept
    if "failures" in new:
        results = merged["results"]
        failures = [line for key, entry in results.items() for line in describe_failures(key, entry)]
        merged["failures"], merged["passed"] = failures, not failures
    return merged


def save_result(run_dir: PathLike, name: str, data: Mapping[str, Any]) -> Path:
    """Merge a stage's result (VALIDATE_FILE or BENCH_FILE) into RUN/report/<name> atomically and
    record it (see merge_results).

    An unreadable earlier file is replaced. If the file cannot be written (a read-only run, a full
    disk), the OutputError carries the new result as JSON, which the command prints: a measurement
    that took minutes is not lost to a full disk.
    """
    path = report_dir(run_dir) / name
    try:
        previous = load_result(run_dir, name)
    except UsageError:
        previous = None
    try:
        write_json_atomic(path, merge_results(previous, data))
        record_report_files(run_dir, [path])
    except OutputError as exc:
        raise OutputError(
            f"{exc}; the measurement was printed to stdout as JSON instead",
            salvage=json.dumps(data, indent=2),
        ) from exc
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
