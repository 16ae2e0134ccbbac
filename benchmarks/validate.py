"""Accuracy, parity against a reference format, and the gates every exported format must pass.

Every target sees the same validation images in one pass over the data: the reference (the
PyTorch student "torch/fp32", or the fp32 ONNX file where torch is not installed) runs first on
each batch, then each other format, and running tallies keep memory flat whatever the size of the
validation split. The gates are deploy.gates' (docs/METHOD.md section 7): per precision, in
percent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.measured import SOURCE_GIVEN, measured_block
from benchmarks.targets import Target, check_unique, error_reason, infer_in_range, open_target
from deploy.errors import GateFailedError, UsageError
from deploy.gates import GateTable, default_gates, describe_check, evaluate_gates, gates_for
from deploy.paired_stats import PairedComparison
from deploy.runners.base import Runner
from deploy.status import Status

REFERENCE_KEY = "torch/fp32"
# 2: results record what they measured ("measured") and keep other kinds ("other_measurements").
VALIDATE_SCHEMA_VERSION = 2


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
    # Paired with the reference on the same images: both right, reference only, this only, neither.
    paired: np.ndarray = field(default_factory=lambda: np.zeros((2, 2), dtype=np.int64))

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

    def add_paired(self, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> None:
        ref_right = np.argmax(reference, axis=1) == labels
        right = np.argmax(logits, axis=1) == labels
        np.add.at(self.paired, (1 - ref_right.astype(int), 1 - right.astype(int)), 1)

    def paired_comparison(self) -> PairedComparison | None:
        n = int(self.paired.sum())
        if not n:
            return None
        ref_correct = int(self.paired[0].sum())
        losses, gains = int(self.paired[0, 1]), int(self.paired[1, 0])
        return PairedComparison(n, ref_correct, ref_correct - losses + gains, losses, gains)

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


def validate_runners(
    targets: Sequence[Target],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    reference: str = REFERENCE_KEY,
    gates: Mapping[str, Mapping[str, float]] | None = None,
    inconclusive_passes: bool = True,
    source: Mapping[str, Any] | None = None,
    student_sha256: str | None = None,
) -> dict[str, Any]:
    """Measure accuracy and parity of every target on the same batches and check the gates.

    targets: the formats, one of them keyed `reference` (parity is measured against it). Each is
        opened here and closed before returning; one that cannot open is "skipped"
        (MissingDependencyError) or "failed" (anything else), and one that raises while running
        is "failed"; the others carry on.
    batches: (float32 NCHW images, integer labels) pairs, iterated once.
    gates: per-precision thresholds (default deploy.gates.DEFAULT_GATES); the reference is not gated.
        max_top1_drop is judged on the paired 95% interval of the drop against the reference;
        `inconclusive_passes` says whether a gate the sample cannot resolve passes.
    source, student_sha256: where the batches came from (benchmarks.measured; default: given by
        the caller) and the run's student, recorded with the image count in "measured".

    Returns the content of validate.json: {"schema_version", "reference", "images", "gates",
    "results": {key: entry}, "passed", "failures", "bad_files", "measured"}, where each entry has
    "status", "reason", backend, precision, file, size_bytes, "accuracy" {top1, top5, n, top1_drop}, "parity"
    {max_abs_diff, mean_abs_diff, top1_agreement, n} and "gates" (one check per gate);
    "bad_files" names the formats whose file is missing, tampered with or malformed. It does not
    raise on a failed gate or a bad file: call `raise_for_gates` after saving the result.
    """
    check_unique(targets)
    keys = [t.key for t in targets]
    if reference not in keys:
        raise UsageError(f"the reference {reference!r} is not among the formats: {', '.join(keys)}")
    gate_set: GateTable = default_gates() if gates is None else {p: dict(g) for p, g in gates.items()}
    # The reference goes first so that every other target can be compared on each batch.
    ordered = sorted(targets, key=lambda t: t.key != reference)

    runners: dict[str, Runner] = {}
    outcome: dict[str, tuple[Status, str | None]] = {}
    bad_files: list[str] = []
    tallies = {t.key: _Tally() for t in ordered}
    images_seen = 0
    try:
        for target in ordered:
            opened = open_target(target)
            outcome[target.key] = (opened.status, opened.reason)
            if opened.runner is not None:
                runners[target.key] = opened.runner
            if opened.bad_input:
                bad_files.append(f"{target.key}: {opened.reason}")
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
                    outcome[target.key] = (Status.FAILED, f"batch {index}: {error_reason(exc)}")
                    runners.pop(target.key).close()
                    continue
                tally = tallies[target.key]
                tally.add_accuracy(logits, labels)
                if target.key == reference:
                    ref_logits = logits
                elif ref_logits is not None:
                    tally.add_parity(logits, ref_logits)
                    tally.add_paired(logits, ref_logits, labels)
    finally:
        for runner in runners.values():
            runner.close()
    if images_seen == 0:
        raise UsageError("no validation images: the validation split is empty")

    ref_top1 = tallies[reference].accuracy()["top1"] if outcome[reference][0] == Status.OK else None
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for target in targets:
        status, reason = outcome[target.key]
        tally = tallies[target.key]
        entry: dict[str, Any] = {"status": status, "reason": reason, **target.describe()}
        entry["accuracy"] = None
        entry["parity"] = None
        entry["gates"] = []
        if status == Status.OK:
            accuracy = tally.accuracy()
            accuracy["top1_drop"] = (
                None if ref_top1 is None or accuracy["top1"] is None else ref_top1 - accuracy["top1"]
            )
            paired = tally.paired_comparison()
            if paired is not None:
                accuracy["paired"] = paired.counts()
                accuracy["top1_drop_ci"] = [100 * bound for bound in paired.interval]
            entry["accuracy"] = accuracy
            if target.key != reference:
                entry["parity"] = tally.parity()
                if entry["parity"] is None:
                    entry["reason"] = f"parity not measured: the reference {reference} did not run"
                entry["gates"] = evaluate_gates(
                    entry, gates_for(gate_set, target.precision), inconclusive_passes=inconclusive_passes
                )
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
        "bad_files": bad_files,
        "measured": measured_block(
            {"kind": SOURCE_GIVEN, "path": None, **(source or {}), "images": images_seen},
            reference,
            student_sha256,
        ),
    }


def describe_failures(key: str, entry: Mapping[str, Any]) -> list[str]:
    """Return one line per reason this entry fails validation (a failed run or a failed gate)."""
    if entry["status"] == Status.FAILED:
        return [f"{key}: failed to run ({entry['reason']})"]
    if entry["status"] == Status.SKIPPED:
        return []
    return [f"{key}: {describe_check(check)}" for check in entry.get("gates", []) if not check["passed"]]


def raise_for_gates(result: Mapping[str, Any]) -> None:
    """Raise for a validate result that did not pass.

    UsageError (exit 2) when a format's file is missing, tampered with or malformed: that is bad
    input, not a measurement; else GateFailedError (exit 1) naming every failing format and gate.
    """
    bad_files = list(result.get("bad_files", []))
    if bad_files:
        raise UsageError("cannot validate: " + "; ".join(bad_files))
    failures = list(result.get("failures", []))
    if failures:
        raise GateFailedError("validation failed: " + "; ".join(failures))
