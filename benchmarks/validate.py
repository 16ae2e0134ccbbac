"""Accuracy, parity against the PyTorch reference, and the gates every exported format must pass.

Every target sees the same validation images in one pass over the data: the reference
("torch/fp32") runs first on each batch, then each other format, and running tallies keep
memory flat whatever the size of the validation split.

Gates (docs/METHOD.md section 7) are per precision; a precision label such as "int8-sym" falls back
to the gates of its family ("int8"). Gate names say their direction:

    max_abs_diff      parity max |logit diff| <= threshold
    max_mean_abs_diff parity mean |logit diff| <= threshold
    min_agreement     parity top-1 agreement (%) >= threshold
    max_top1_drop     reference top-1 minus this top-1 (points) <= threshold
    min_top1          top-1 (%) >= threshold

Accuracies and agreement are percentages (0-100).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.targets import (
    FAILED,
    OK,
    SKIPPED,
    Target,
    check_unique,
    error_reason,
    infer_in_range,
    open_target,
    precision_family,
)
from deploy.errors import GateFailedError, UsageError
from deploy.runners.base import Runner

REFERENCE_KEY = "torch/fp32"
VALIDATE_SCHEMA_VERSION = 1

# name -> (where the value lives, "<=" upper bound or ">=" lower bound)
GATE_METRICS: dict[str, tuple[str, str]] = {
    "max_abs_diff": ("parity.max_abs_diff", "<="),
    "max_mean_abs_diff": ("parity.mean_abs_diff", "<="),
    "min_agreement": ("parity.top1_agreement", ">="),
    "max_top1_drop": ("accuracy.top1_drop", "<="),
    "min_top1": ("accuracy.top1", ">="),
}

Gates = dict[str, dict[str, float]]

DEFAULT_GATES: Gates = {
    "fp32": {"max_abs_diff": 1e-4, "min_agreement": 100.0},
    "fp16": {"min_agreement": 99.0},
    "int8": {"max_top1_drop": 1.0},
}


def default_gates() -> Gates:
    """Return a fresh copy of the default gates (safe to modify)."""
    return copy.deepcopy(DEFAULT_GATES)


def parse_gate(spec: str) -> tuple[str, str, float | None]:
    """Parse "PRECISION:NAME=VALUE" (VALUE "off" removes the gate) into (precision, name, value)."""
    precision, sep, rest = spec.partition(":")
    name, eq, raw = rest.partition("=")
    precision, name, raw = precision.strip(), name.strip(), raw.strip()
    if not sep or not eq or not precision or not name or not raw:
        raise UsageError(f"--gate {spec!r}: expected PRECISION:NAME=VALUE, e.g. fp16:min_agreement=99.5")
    if name not in GATE_METRICS:
        raise UsageError(f"--gate {spec!r}: unknown gate {name!r}; expected one of {', '.join(GATE_METRICS)}")
    if raw.lower() == "off":
        return precision, name, None
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"--gate {spec!r}: {raw!r} is not a number (or 'off')") from None
    if not math.isfinite(value):
        raise UsageError(f"--gate {spec!r}: the threshold must be finite")
    return precision, name, value


def apply_gate(gates: Gates, precision: str, name: str, value: float | None) -> Gates:
    """Set (or, with value None, remove) one gate in `gates` and return it."""
    if value is None:
        gates.get(precision, {}).pop(name, None)
    else:
        gates.setdefault(precision, {})[name] = value
    return gates


def gates_for(gates: Mapping[str, Mapping[str, float]], precision: str) -> dict[str, float]:
    """Return the gates of a precision: its own entry, else its family's ("int8" for "int8-sym")."""
    if precision in gates:
        return dict(gates[precision])
    return dict(gates.get(precision_family(precision), {}))


@dataclass
class _Tally:
    """Running counts for one target over the validation pass."""

    n: int = 0
    correct1: int = 0
    correct5: int = 0
    agree: int = 0
    compared: int = 0
    abs_sum: float = 0.0
    abs_max: float = 0.0
    elements: int = 0
    topk: int = 5
    errors: list[str] = field(default_factory=list)

    def add_accuracy(self, logits: np.ndarray, labels: np.ndarray) -> None:
        k = min(self.topk, logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        self.correct1 += int(np.sum(top[:, 0] == labels))
        self.correct5 += int(np.sum(np.any(top == labels[:, None], axis=1)))
        self.n += int(labels.shape[0])

    def add_parity(self, logits: np.ndarray, reference: np.ndarray) -> None:
        diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
        # A NaN logit must fail the max gate, not vanish from it.
        worst = float(np.max(diff)) if diff.size else 0.0
        self.abs_max = worst if math.isnan(worst) else max(self.abs_max, worst)
        self.abs_sum += float(np.sum(diff))
        self.elements += int(diff.size)
        self.agree += int(np.sum(np.argmax(logits, axis=1) == np.argmax(reference, axis=1)))
        self.compared += int(logits.shape[0])

    def accuracy(self) -> dict[str, Any]:
        return {
            "top1": 100.0 * self.correct1 / self.n if self.n else None,
            "top5": 100.0 * self.correct5 / self.n if self.n else None,
            "n": self.n,
        }

    def parity(self) -> dict[str, Any] | None:
        if not self.compared:
            return None
        return {
            "max_abs_diff": self.abs_max,
            "mean_abs_diff": self.abs_sum / self.elements if self.elements else 0.0,
            "top1_agreement": 100.0 * self.agree / self.compared,
            "n": self.compared,
        }


def _check_batch(images: np.ndarray, labels: np.ndarray, index: int) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise UsageError(f"validation batch {index}: expected (N, C, H, W) images")
    labels_ok = isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.shape[0] == images.shape[0]
    if not labels_ok:
        raise UsageError(f"validation batch {index}: expected one integer label per image")


def _gate_value(entry: Mapping[str, Any], where: str) -> float | None:
    section, key = where.split(".")
    block = entry.get(section)
    if not isinstance(block, Mapping):
        return None
    value = block.get(key)
    return None if value is None else float(value)


def evaluate_gates(entry: dict[str, Any], gates: Mapping[str, float]) -> list[dict[str, Any]]:
    """Check one result entry against its gates; a value that was not measured fails its gate."""
    checks = []
    for name, threshold in gates.items():
        where, op = GATE_METRICS[name]
        value = _gate_value(entry, where)
        if value is None or math.isnan(value):
            passed = False
        else:
            passed = value <= threshold if op == "<=" else value >= threshold
        check = {"gate": name, "metric": where, "op": op, "threshold": threshold, "value": value}
        check["passed"] = passed
        checks.append(check)
    return checks


def validate_runners(
    targets: Sequence[Target],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    reference: str = REFERENCE_KEY,
    gates: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Measure accuracy and parity of every target on the same batches and check the gates.

    targets: the formats, one of them keyed `reference` (parity is measured against it). Each is
        opened here and closed before returning; one that cannot open is "skipped"
        (MissingDependencyError) or "failed" (anything else), and one that raises while running
        is "failed"; the others carry on.
    batches: (float32 NCHW images, integer labels) pairs, iterated once.
    gates: per-precision thresholds (default DEFAULT_GATES); the reference is not gated.

    Returns the content of validate.json: {"schema_version", "reference", "images", "gates",
    "results": {key: entry}, "passed", "failures"}, where each entry has "status", "reason",
    backend, precision, file, size_bytes, "accuracy" {top1, top5, n, top1_drop}, "parity"
    {max_abs_diff, mean_abs_diff, top1_agreement, n} and "gates" (one check per gate). It does
    not raise on a failed gate: call `raise_for_gates` after saving the result.
    """
    check_unique(targets)
    keys = [t.key for t in targets]
    if reference not in keys:
        raise UsageError(f"the reference {reference!r} is not among the formats: {', '.join(keys)}")
    gate_set = default_gates() if gates is None else {p: dict(g) for p, g in gates.items()}
    # The reference goes first so that every other target can be compared on each batch.
    ordered = sorted(targets, key=lambda t: t.key != reference)

    runners: dict[str, Runner] = {}
    outcome: dict[str, tuple[str, str | None]] = {}
    tallies = {t.key: _Tally() for t in ordered}
    images_seen = 0
    try:
        for target in ordered:
            runner, status, reason = open_target(target)
            outcome[target.key] = (status, reason)
            if runner is not None:
                runners[target.key] = runner
        for index, (images, labels) in enumerate(batches):
            _check_batch(images, labels, index)
            labels = labels.astype(np.int64, copy=False)
            images_seen += int(images.shape[0])
            ref_logits: np.ndarray | None = None
            for target in ordered:
                runner_or_none = runners.get(target.key)
                if runner_or_none is None:
                    continue
                try:
                    logits = np.asarray(infer_in_range(runner_or_none, images), dtype=np.float32)
                    if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
                        raise ValueError(f"logits of shape {logits.shape} for {images.shape[0]} images")
                except Exception as exc:
                    # One broken format must not stop the others from being measured.
                    outcome[target.key] = (FAILED, f"batch {index}: {error_reason(exc)}")
                    runners.pop(target.key).close()
                    continue
                tally = tallies[target.key]
                tally.add_accuracy(logits, labels)
                if target.key == reference:
                    ref_logits = logits
                elif ref_logits is not None:
                    tally.add_parity(logits, ref_logits)
    finally:
        for runner in runners.values():
            runner.close()
    if images_seen == 0:
        raise UsageError("no validation images: the validation split is empty")

    ref_top1 = tallies[reference].accuracy()["top1"] if outcome[reference][0] == OK else None
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for target in targets:
        status, reason = outcome[target.key]
        tally = tallies[target.key]
        entry: dict[str, Any] = {"status": status, "reason": reason, **target.describe()}
        entry["accuracy"] = None
        entry["parity"] = None
        entry["gates"] = []
        if status == OK:
            accuracy = tally.accuracy()
            accuracy["top1_drop"] = (
                None if ref_top1 is None or accuracy["top1"] is None else ref_top1 - accuracy["top1"]
            )
            entry["accuracy"] = accuracy
            if target.key != reference:
                entry["parity"] = tally.parity()
                if entry["parity"] is None:
                    entry["reason"] = f"parity not measured: the reference {reference} did not run"
                entry["gates"] = evaluate_gates(entry, gates_for(gate_set, target.precision))
        results[target.key] = entry
        failures.extend(describe_failures(target.key, entry))
    return {
        "schema_version": VALIDATE_SCHEMA_VERSION,
        "reference": reference,
        "images": images_seen,
        "gates": gate_set,
        "results": results,
        "passed": not failures,
        "failures": failures,
    }


def describe_failures(key: str, entry: Mapping[str, Any]) -> list[str]:
    """Return one line per reason this entry fails validation (a failed run or a failed gate)."""
    if entry["status"] == FAILED:
        return [f"{key}: failed to run ({entry['reason']})"]
    if entry["status"] == SKIPPED:
        return []
    lines = []
    for check in entry.get("gates", []):
        if check["passed"]:
            continue
        value = "not measured" if check["value"] is None else f"{check['value']:.6g}"
        lines.append(
            f"{key}: gate {check['gate']} failed: {check['metric']} = {value}, "
            f"required {check['op']} {check['threshold']:g}"
        )
    return lines


def raise_for_gates(result: Mapping[str, Any]) -> None:
    """Raise GateFailedError (exit code 1) naming every failing format and gate of a validate result."""
    failures = list(result.get("failures", []))
    if failures:
        raise GateFailedError("validation failed: " + "; ".join(failures))
