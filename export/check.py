"""Parity checks of each exported ONNX file against the PyTorch student it came from.

The gates are deploy.gates' (the same table `reviewkd validate` applies), in percent: by default
fp32 max |diff| of logits <= 1e-4 and 100% top-1 agreement; fp16 top-1 agreement >= 99%; int8
top-1 accuracy at most 1 point under the student's, judged on the paired 95% interval of the drop
over the check images (deploy.paired_stats). The uint8-input variant with baked-in
preprocessing is an fp32 model and is held to the fp32 gates. On random inputs (no images: no
labels) a file is also held to deploy.gates.RANDOM_INPUT_GATES (fp16: the relative L2 error of its
logits), and its agreement gate is judged on the agreement's interval: a shortfall 64 inputs cannot
resolve is inconclusive, not a failure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploy.errors import UsageError
from deploy.gates import (
    DEFAULT_GATES,
    GATE_METRICS,
    RANDOM_INPUT_GATES,
    describe_check,
    evaluate_gates,
    gates_for,
)
from deploy.paired_stats import compare_predictions
from deploy.runners.onnxruntime_runner import CPU_PROVIDER, open_session
from deploy.status import Status

# The parity numbers of `compare` the gates read.
PARITY_METRICS = ("n", "max_abs_diff", "mean_abs_diff", "rel_l2_error", "top1_agreement")
# The precision label of the uint8-input variant, and the gates it is held to.
UINT8_INPUT = "uint8"


@dataclass
class CheckResult:
    """The outcome of one file's check: passed, failed or skipped (status), and the numbers."""

    path: str
    precision: str
    status: Status
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether the file may be used (a skipped check does not fail the file)."""
        return self.status != Status.FAILED

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form for the manifest."""
        return {"status": self.status, "reason": self.reason, **self.metrics}


def session_threads() -> int:
    """Intra-op threads of export's own sessions: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def open_check_session(path: str | os.PathLike[str]) -> Any:
    """A CPU session on the ONNX file at `path` as export's checks, scores and searches run it.

    It is opened as deploy opens it (`open_session`): a file whose int8 description asks for it runs
    its Q/DQ pairs unfused, as TensorRT computes them, exactly as `reviewkd validate` runs it. Its
    intra-op threads are `session_threads()`, and idle ones sleep rather than spin: ONNX Runtime's
    busy-waiting threads computed nothing and, beside another job on the CPUs, doubled the CPU time
    of a check (the digits student's files, 2 CPUs).
    """
    return open_session(path, [CPU_PROVIDER], threads=session_threads(), spinning=False)[0]


def run_onnx(path: str | os.PathLike[str], batches: Sequence[np.ndarray]) -> np.ndarray:
    """Run an ONNX file on the CPU over `batches` and return the concatenated first output.

    The session is `open_check_session`'s: the file's own semantics, as `reviewkd validate` runs it.
    """
    session = open_check_session(path)
    input_name = session.get_inputs()[0].name
    outputs = [np.asarray(session.run(None, {input_name: batch})[0], dtype=np.float32) for batch in batches]
    return np.concatenate(outputs)


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Parity numbers of `logits` against `reference`, and top-1 accuracies (%) where labels exist."""
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    count = len(logits)

    def percent(hits: np.ndarray) -> float:
        # From counts, as validate computes them, so that both agree to the last bit at a gate's edge.
        return 100.0 * int(np.sum(hits)) / count

    scale = max(float(np.linalg.norm(reference.astype(np.float64))), 1e-12)
    metrics: dict[str, Any] = {
        "n": count,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "rel_l2_error": float(np.linalg.norm(diff)) / scale,
        "top1_agreement": percent(logits.argmax(1) == reference.argmax(1)),
    }
    if labels is not None:
        metrics["top1"] = percent(logits.argmax(1) == labels)
        metrics["reference_top1"] = percent(reference.argmax(1) == labels)
        paired = compare_predictions(labels, reference.argmax(1), logits.argmax(1))
        metrics["paired"] = paired.counts()
        metrics["top1_drop_ci"] = [100 * bound for bound in paired.interval]
    return metrics


def gate(
    precision: str,
    metrics: Mapping[str, Any],
    gates: Mapping[str, Mapping[str, float]] = DEFAULT_GATES,
    *,
    random_inputs: bool = False,
) -> tuple[Status, str]:
    """Hold `metrics` (from `compare`) to the precision's gates; return (status, reason).

    A gate on accuracy without labelled images cannot be measured: the check is skipped. With
    `random_inputs` (the check had no images), RANDOM_INPUT_GATES add to the precision's gates and
    the agreement gate is judged on its interval (deploy.gates).
    """
    gated = "fp32" if precision == UINT8_INPUT else precision
    precision_gates = gates_for(gates, gated)
    if random_inputs:
        precision_gates.update(gates_for(RANDOM_INPUT_GATES, gated))
    if not precision_gates:
        raise UsageError(f"no parity gate for precision {precision!r}")
    top1 = metrics.get("top1")
    reference_top1 = metrics.get("reference_top1")
    if top1 is None and any(GATE_METRICS[name].metric.startswith("accuracy.") for name in precision_gates):
        return Status.SKIPPED, f"{precision} accuracy gate needs labelled images"
    measurement = {
        "parity": {k: metrics.get(k) for k in PARITY_METRICS},
        "accuracy": {
            "top1": top1,
            "top1_drop": None if top1 is None or reference_top1 is None else reference_top1 - top1,
            "paired": metrics.get("paired"),
        },
    }
    checks = evaluate_gates(measurement, precision_gates, agreement_interval=random_inputs)
    status = Status.OK if all(c["passed"] for c in checks) else Status.FAILED
    return status, "; ".join(describe_check(c) for c in checks)


def check_file(
    path: str | os.PathLike[str],
    precision: str,
    batches: Sequence[np.ndarray],
    reference: np.ndarray,
    labels: np.ndarray | None,
) -> CheckResult:
    """Run `path` on `batches` and hold its logits against the student's `reference` logits."""
    metrics = compare(run_onnx(path, batches), reference, labels)
    status, reason = gate(precision, metrics, random_inputs=labels is None)
    return CheckResult(str(Path(path)), precision, status, reason, metrics)
