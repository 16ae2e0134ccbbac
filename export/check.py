"""Parity checks of each exported ONNX file against the PyTorch student it came from.

Gates (issue 4): fp32 max |diff| of logits <= 1e-4 and 100% top-1 agreement; fp16 top-1
agreement >= 99%; int8 top-1 accuracy at most 1 point under the student's. The uint8 variant
with baked-in preprocessing is held to the fp32 gate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploy.errors import UsageError

FP32_MAX_ABS_DIFF = 1e-4
FP16_MIN_AGREEMENT = 0.99
INT8_MAX_TOP1_DROP = 0.01


@dataclass
class CheckResult:
    """The outcome of one file's check: passed, failed or skipped (status), and the numbers."""

    path: str
    precision: str
    status: str  # "ok", "failed" or "skipped"
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether the file may be used (a skipped check does not fail the file)."""
        return self.status != "failed"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form for the manifest."""
        return {"status": self.status, "reason": self.reason, **self.metrics}


def run_onnx(path: str | os.PathLike[str], batches: Sequence[np.ndarray]) -> np.ndarray:
    """Run an ONNX file on the CPU over `batches` and return the concatenated first output."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise UsageError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
    input_name = session.get_inputs()[0].name
    outputs = [np.asarray(session.run(None, {input_name: batch})[0], dtype=np.float32) for batch in batches]
    return np.concatenate(outputs)


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Parity numbers of `logits` against `reference` (and top-1 accuracy where labels exist)."""
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    metrics: dict[str, Any] = {
        "n": len(logits),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
    }
    if labels is not None:
        metrics["top1"] = float(np.mean(logits.argmax(1) == labels))
        metrics["reference_top1"] = float(np.mean(reference.argmax(1) == labels))
    return metrics


def gate(precision: str, metrics: dict[str, Any]) -> tuple[str, str]:
    """Apply the precision's gate to `metrics`; return (status, reason)."""
    if precision in ("fp32", "uint8"):
        ok = metrics["max_abs_diff"] <= FP32_MAX_ABS_DIFF and metrics["top1_agreement"] == 1.0
        rule = f"max|diff| <= {FP32_MAX_ABS_DIFF:g} and 100% top-1 agreement"
        got = f"max|diff| {metrics['max_abs_diff']:.3g}, agreement {metrics['top1_agreement']:.2%}"
    elif precision == "fp16":
        ok = metrics["top1_agreement"] >= FP16_MIN_AGREEMENT
        rule = f"top-1 agreement >= {FP16_MIN_AGREEMENT:.0%}"
        got = f"agreement {metrics['top1_agreement']:.2%}"
    elif precision == "int8":
        if "top1" not in metrics:
            return "skipped", "int8 accuracy gate needs labelled images"
        ok = metrics["top1"] >= metrics["reference_top1"] - INT8_MAX_TOP1_DROP
        rule = f"top-1 at most {INT8_MAX_TOP1_DROP:.0%} under the student's"
        got = f"top-1 {metrics['top1']:.2%} vs {metrics['reference_top1']:.2%}"
    else:
        raise UsageError(f"no parity gate for precision {precision!r}")
    return ("ok", got) if ok else ("failed", f"{got}; needs {rule}")


def check_file(
    path: str | os.PathLike[str],
    precision: str,
    batches: Sequence[np.ndarray],
    reference: np.ndarray,
    labels: np.ndarray | None,
) -> CheckResult:
    """Run `path` on `batches` and hold its logits against the student's `reference` logits."""
    metrics = compare(run_onnx(path, batches), reference, labels)
    status, reason = gate(precision, metrics)
    return CheckResult(str(Path(path)), precision, status, reason, metrics)
