"""The report's inputs inside a run directory: the stage results in RUN/report and metrics.jsonl."""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.latency import BENCH_SCHEMA_VERSION
from benchmarks.measured import measurement_key, short_sha, source_text, student_of
from benchmarks.validate import VALIDATE_SCHEMA_VERSION, describe_failures
from deploy import run_layout
from deploy.errors import OutputError, UsageError
from deploy.fileio import parse_json, write_json_atomic
from deploy.manifest import forget_artifact, read_manifest, record_artifact, write_manifest
from deploy.status import Status

REPORT_DIR = run_layout.REPORT_DIR
VALIDATE_FILE = run_layout.VALIDATE_FILE
BENCH_FILE = run_layout.BENCH_FILE
METRICS_FILE = run_layout.METRICS
STAGE_SCHEMA_VERSIONS = {VALIDATE_FILE: VALIDATE_SCHEMA_VERSION, BENCH_FILE: BENCH_SCHEMA_VERSION}
# What a stage file of the current schema has that older ones lack, said when an older one is refused.
_SCHEMA_NEWS = {
    VALIDATE_FILE: "results that record which images, reference and student they measured",
    BENCH_FILE: (
        "measurements with a steady-state warm-up, percentile intervals, a stable/noisy verdict, the"
        " machine's state and energy per image"
    ),
}

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


def measurements(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every measurement a stage file holds, oldest first: its "other_measurements", then the
    latest (the file's top level, without that list)."""
    latest = {name: value for name, value in result.items() if name != "other_measurements"}
    others = result.get("other_measurements")
    earlier = others if isinstance(others, list) else []
    return [m for m in [*earlier, latest] if isinstance(m, dict) and isinstance(m.get("results"), dict)]


def outdated_reason(result: Mapping[str, Any], name: str) -> str | None:
    """Why a stage file cannot be read as this version writes it, or None when it can.

    Files of an older schema did not record what they measured (the images, the reference, the
    student), so their numbers cannot be matched with anything, bench files before version 3 have no
    stability verdicts and before version 4 no machine state: the stage measures them again (the
    report says so, validate and bench replace the file).
    """
    version = result.get("schema_version")
    current = STAGE_SCHEMA_VERSIONS[name]
    if version == current:
        return None
    news = _SCHEMA_NEWS[name]
    return f"{REPORT_DIR}/{name} has schema version {version}, this reviewkd reads {current} ({news})"


# What a save says about its merge; an earlier measurement kept beside the new one sheds its own.
_MERGE_NOTES = ("kept_from_earlier", "discarded")


def _merge_entries(into: dict[str, Any], earlier: Mapping[str, Any]) -> list[str]:
    """Add an earlier measurement's entries of the same kind to `into`; return the keys kept.

    A format measured now replaces its earlier entry, except that a format skipped now (its
    runtime is missing on this machine) keeps an earlier measurement made where it could run.
    """
    results = into["results"]
    kept = []
    for key, old in earlier.get("results", {}).items():
        fresh = results.get(key)
        skipped_now = fresh is not None and fresh.get("status") == Status.SKIPPED
        if fresh is None or (skipped_now and old.get("status") != Status.SKIPPED):
            results[key] = old
            kept.append(key)
    return kept


def merge_results(previous: Mapping[str, Any] | None, new: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A stage's new result over the measurements already in RUN/report/<name>.

    Only measurements of the same kind are merged (benchmarks.measured: the same inputs and image
    count, the same reference, the same student): there, formats measured now replace their old
    entries and the others keep theirs (listed under "kept_from_earlier"), so a run validated or
    benched for a subset of formats (onnxruntime on a laptop, tensorrt on the GPU host) keeps the
    other formats' numbers. Measurements of another kind on the same student (--limit, --data,
    another reference) stay beside it in "other_measurements"; measurements of another student,
    or in an older schema, are dropped, each named in "discarded". A validate result's "passed"
    and "failures" are recomputed over every entry of the merged measurement.
    """
    merged: dict[str, Any] = {**new, "results": dict(new["results"])}
    merged.pop("other_measurements", None)
    kept: list[str] = []
    others: list[dict[str, Any]] = []
    same_kind: list[dict[str, Any]] = []
    discarded: list[str] = []
    outdated = None if previous is None else outdated_reason(previous, name)
    if outdated is not None:
        discarded.append(f"replaced the earlier results: {outdated}")
    elif previous is not None:
        key, student = measurement_key(new), student_of(new)
        for earlier in measurements(previous):
            if measurement_key(earlier) == key:
                same_kind.append(earlier)
                kept += [k for k in _merge_entries(merged, earlier) if k not in kept]
            elif student is not None and student_of(earlier) not in (None, student):
                discarded.append(
                    f"dropped the measurement on {source_text(earlier)} of student"
                    f" {short_sha(student_of(earlier))}: the run's student is now {short_sha(student)}"
                )
            else:
                others.append({k: v for k, v in earlier.items() if k not in _MERGE_NOTES})
    if not new["results"] and same_kind:
        # A result that timed no format (bench --compare) keeps the settings and machine of the
        # formats it keeps; each comparison records its own.
        merged["settings"] = same_kind[-1].get("settings", merged.get("settings"))
        merged["environment"] = same_kind[-1].get("environment", merged.get("environment"))
    if "comparisons" in merged or any("comparisons" in m for m in same_kind):
        # A comparison measured now replaces the same pair's earlier one; the others stay.
        comparisons: dict[str, Any] = {}
        for earlier in same_kind:
            comparisons.update(earlier.get("comparisons") or {})
        merged["comparisons"] = {**comparisons, **(new.get("comparisons") or {})}
    merged["kept_from_earlier"] = kept
    merged["discarded"] = discarded
    merged["other_measurements"] = others
    if "failures" in new:
        results = merged["results"]
        failures = [line for key, entry in results.items() for line in describe_failures(key, entry)]
        merged["failures"], merged["passed"] = failures, not failures
    return merged


def save_result(run_dir: PathLike, name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a stage's result (VALIDATE_FILE or BENCH_FILE) into RUN/report/<name> atomically,
    record it (see merge_results) and return what was written.

    An unreadable earlier file is replaced. If the file cannot be written (a read-only run, a full
    disk), the OutputError carries the new result as JSON, which the command prints: a measurement
    that took minutes is not lost to a full disk.
    """
    path = report_dir(run_dir) / name
    try:
        previous = load_result(run_dir, name)
    except UsageError:
        previous = None
    merged = merge_results(previous, data, name)
    try:
        write_json_atomic(path, merged)
        record_report_files(run_dir, [path])
    except OutputError as exc:
        raise OutputError(
            f"{exc}; the measurement was printed to stdout as JSON instead",
            salvage=json.dumps(data, indent=2),
        ) from exc
    return merged


def saved_with_notes(run_dir: PathLike, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Save a stage's result (save_result) and return it, as measured now, with what the merge kept
    and dropped ("kept_from_earlier", "discarded", "other_measurements": for the command to say)."""
    merged = save_result(run_dir, name, result)
    return {**result, **{k: merged[k] for k in ("kept_from_earlier", "discarded", "other_measurements")}}


def load_result(run_dir: PathLike, name: str) -> dict[str, Any] | None:
    """Read RUN/report/<name>; None when it does not exist, UsageError when it is not valid JSON."""
    path = report_dir(run_dir) / name
    if not path.is_file():
        return None
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path}: not readable JSON ({exc}); run the stage that writes it again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UsageError(f"{path}: no 'results' object; run the stage that writes it again")
    try:
        _check_result(data)
    except TypeError as exc:
        raise UsageError(f"{path}: {exc}; run the stage that writes it again") from None
    return data


# The parts of a validate or bench result the report reads, and the JSON types they must have;
# `None` in a tuple: the key may hold null. Keys not listed are free; a listed key may be missing.
_Number = int | float
_RESULT_TYPES: dict[str, Any] = {
    "settings": dict,
    "environment": dict,
    "reference": str,
    "gates": dict,
    "comparisons": dict,
}
_ENTRY_TYPES: dict[str, Any] = {
    "status": str,
    "reason": str | None,
    "file": str | None,
    "sha256": str | None,
    "size_bytes": int | None,
    "device": str | None,
    "accuracy": dict | None,
    "parity": dict | None,
    "gates": list,
    "latency": dict,
    "skipped_batches": dict,
    "cuda_graphs": dict | None,
}
_ACCURACY_TYPES: dict[str, Any] = {
    "top1": _Number,
    "top5": _Number,
    "n": int,
    "top1_drop": _Number | None,
    "top1_drop_ci": list | None,
}
_PARITY_TYPES: dict[str, Any] = {"max_abs_diff": _Number, "mean_abs_diff": _Number, "top1_agreement": _Number}
_LATENCY_TYPES: dict[str, Any] = {
    **{name: _Number for name in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms")},
    **{f"p{q}_ci_ms": list for q in (50, 90, 99)},
    "iters": int,
    "warmup_iters": int,
    "warmup_steady": bool | None,
    "cv": _Number | None,
    "throughput_ips": _Number | None,
    "verdict": str,
    "noisy_because": str | None,
}


def _check_types(where: str, block: Mapping[str, Any], types: Mapping[str, Any]) -> None:
    """TypeError naming the first key of `block` whose value is not of its listed type."""
    for key, expected in types.items():
        if key not in block:
            continue
        value = block[key]
        allowed = typing.get_args(expected) or (expected,)
        # JSON true is no number: bool is an int subclass, accepted only where bool is listed.
        is_bool = isinstance(value, bool) and bool not in allowed
        if is_bool or not isinstance(value, tuple(type(None) if t is None else t for t in allowed)):
            names = " or ".join("null" if t in (None, type(None)) else t.__name__ for t in allowed)
            raise TypeError(f"{where}{key}: expected {names}, got {type(value).__name__}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_COMPARISON_TYPES: dict[str, Any] = {
    "a": str,
    "b": str,
    "status": str,
    "reason": str | None,
    "batches": dict,
    "skipped_batches": dict,
}
_PAIRED_TYPES: dict[str, Any] = {
    "pairs": int,
    "time_ratio": _Number,
    "time_ratio_ci": list,
    "verdict": str,
    "a_p50_ms": _Number,
    "b_p50_ms": _Number,
}


def _check_comparison(where: str, comparison: object) -> None:
    """TypeError naming the first key of a `bench --compare` entry with a value of the wrong type."""
    if not isinstance(comparison, dict):
        raise TypeError(f"{where}: expected an object, got {type(comparison).__name__}")
    _check_types(f"{where}.", comparison, _COMPARISON_TYPES)
    for key in ("a", "b", "status", "batches"):
        if key not in comparison:
            raise TypeError(f"{where}: no {key!r}")
    for batch, paired in comparison["batches"].items():
        inner = f"{where}.batches[{batch!r}]"
        if not isinstance(paired, dict):
            raise TypeError(f"{inner}: expected an object, got {type(paired).__name__}")
        _check_types(f"{inner}.", paired, _PAIRED_TYPES)
        missing = [key for key in _PAIRED_TYPES if key not in paired]
        if missing:
            raise TypeError(f"{inner}: no {missing[0]!r}")
        interval = paired["time_ratio_ci"]
        if len(interval) != 2 or not all(_is_number(v) for v in interval):
            raise TypeError(f"{inner}.time_ratio_ci: expected two numbers")


def _check_result(data: Mapping[str, Any]) -> None:
    """TypeError naming the key where a result file has a value of the wrong JSON type."""
    _check_types("", data, _RESULT_TYPES)
    for pair, comparison in (data.get("comparisons") or {}).items():
        _check_comparison(f"comparisons[{pair!r}]", comparison)
    for key, entry in data["results"].items():
        where = f"results[{key!r}]"
        if not isinstance(entry, dict):
            raise TypeError(f"{where}: expected an object, got {type(entry).__name__}")
        _check_types(f"{where}.", entry, _ENTRY_TYPES)
        accuracy, parity = entry.get("accuracy"), entry.get("parity")
        if accuracy:
            _check_types(f"{where}.accuracy.", accuracy, _ACCURACY_TYPES)
            interval = accuracy.get("top1_drop_ci")
            if interval is not None and (len(interval) != 2 or not all(_is_number(v) for v in interval)):
                raise TypeError(f"{where}.accuracy.top1_drop_ci: expected two numbers")
        if parity:
            _check_types(f"{where}.parity.", parity, _PARITY_TYPES)
        for index, gate in enumerate(entry.get("gates", [])):
            if not isinstance(gate, dict):
                raise TypeError(f"{where}.gates[{index}]: expected an object, got {type(gate).__name__}")
        for batch, stats in entry.get("latency", {}).items():
            if not isinstance(stats, dict):
                raise TypeError(f"{where}.latency[{batch!r}]: expected an object, got {type(stats).__name__}")
            _check_types(f"{where}.latency[{batch!r}].", stats, _LATENCY_TYPES)
            for q in (50, 90, 99):
                interval = stats.get(f"p{q}_ci_ms")
                if interval is not None and (len(interval) != 2 or not all(_is_number(v) for v in interval)):
                    raise TypeError(f"{where}.latency[{batch!r}].p{q}_ci_ms: expected two numbers")


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
