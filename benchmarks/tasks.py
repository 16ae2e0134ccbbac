"""validate and bench per task: the tasks whose evaluation is their own module's, not benchmarks.runs'.

Classification's validate and bench are benchmarks.runs' (runners, logits, top-1); a task listed in
OWN_EVALUATION brings its own, which the commands call through `own_evaluation` instead of asking
for the task by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from benchmarks.detection import (
    bench_detection_run,
    raise_for_detection_gates,
    validate_detection_run,
    validate_lines,
)
from deploy.tasks import DETECTION, run_task


@dataclass(frozen=True)
class Evaluation:
    """A task's validate and bench.

    validate(run, *, threads, batch_size, limit, gates, inconclusive_passes) saves and returns the
    result; `lines(result)` is what the command prints of it; `raise_for_gates(result)` raises
    GateFailedError on a failed gate. bench(run, *, threads, batch_sizes, seconds, iters, warmup,
    compare) saves its result and returns it with the merge's notes (benchmarks.report.saved_with_notes);
    `compare` (A, B) times those two formats interleaved (benchmarks.latency.compare_targets).
    """

    validate: Callable[..., dict[str, Any]]
    lines: Callable[[Mapping[str, Any]], list[str]]
    raise_for_gates: Callable[[Mapping[str, Any]], None]
    bench: Callable[..., dict[str, Any]]


OWN_EVALUATION: dict[str, Evaluation] = {
    DETECTION: Evaluation(
        validate=validate_detection_run,
        lines=validate_lines,
        raise_for_gates=raise_for_detection_gates,
        bench=bench_detection_run,
    ),
}


def own_evaluation(run_dir: str | os.PathLike[str]) -> Evaluation | None:
    """The evaluation of the run's task where it has its own, else None (benchmarks.runs' applies)."""
    spec = run_task(run_dir)
    return OWN_EVALUATION.get(spec.name) if spec is not None else None
