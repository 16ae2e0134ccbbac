"""The tasks reviewkd knows, and what every layer may know of them without torch: the one list of names.

A task is an axis of the whole project (what the data, the models, the loss and the metric are).
This module owns its torch-free contract: the task's name, the methods a config may name for it
(and which of them is the baseline a distilled student is compared with), the metric that ranks
its models (key and label, higher is better), the metrics a model of that task records in the
manifest, and whether the deployment stages (export, validate, bench) exist for it yet.

reviewkd.tasks maps every name of TASKS to its training side (TRAINING_TASKS); a manifest records
its run's task ("task"), read back with `task_of`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import parse_json
from deploy.gates import DEFAULT_GATES, DETECTION_GATES, GateTable

CLASSIFICATION = "classification"
DETECTION = "detection"
# A manifest without a "task" key was written before tasks existed: every such run is a classifier.
DEFAULT_TASK = CLASSIFICATION


@dataclass(frozen=True)
class TaskSpec:
    """One task's torch-free contract.

    Attributes:
        name: the task's name, as configs (`task:`) and manifests ("task") spell it.
        methods: the method names a config may give for it (method.name).
        baseline_method: the method of the student trained without a teacher, which the distilled
            student is compared with; `baseline_label` names that student for people.
        metric_key: the key of the metric that ranks models (the best epoch, the distillation
            gain), as the manifest's model blocks hold it; `metric_label` names it for people.
        higher_is_better: whether a larger metric is a better model.
        model_metrics: the metrics (key, label) a trained model's manifest block records, the
            ranking metric first; all in percent (0-100).
        val_metric_keys: the keys of the validation metrics of each scored epoch in metrics.jsonl.
        gates: the task's default gate table (deploy.gates): what its exported files are held to.
        deploy_skip_reason: None where every deployment command exists for the task; otherwise
            why those not in `ready_actions` are refused, which a run reports in their place.
        ready_actions: the deployment commands (export, validate, bench, ...) that work for the task
            although others do not yet (deploy_skip_reason set).
    """

    name: str
    methods: tuple[str, ...]
    baseline_method: str
    baseline_label: str
    metric_key: str
    metric_label: str
    higher_is_better: bool
    model_metrics: tuple[tuple[str, str], ...]
    val_metric_keys: tuple[str, ...]
    gates: GateTable
    deploy_skip_reason: str | None = None
    ready_actions: tuple[str, ...] = ()

    def is_ready(self, action: str) -> bool:
        """Whether the deployment command or pipeline stage `action` (export, validate, bench,
        quantize, ...) works for the task."""
        return self.deploy_skip_reason is None or action in self.ready_actions


TASKS: dict[str, TaskSpec] = {
    CLASSIFICATION: TaskSpec(
        name=CLASSIFICATION,
        methods=("ce", "kd", "reviewkd", "reviewkd+kd"),
        baseline_method="ce",
        baseline_label="cross-entropy",
        metric_key="top1",
        metric_label="top-1 %",
        higher_is_better=True,
        model_metrics=(("top1", "top-1 %"), ("top5", "top-5 %")),
        val_metric_keys=("val_top1", "val_top5", "val_loss"),
        gates=DEFAULT_GATES,
    ),
    DETECTION: TaskSpec(
        name=DETECTION,
        methods=("plain", "reviewkd"),
        baseline_method="plain",
        baseline_label="plain",
        metric_key="map",
        metric_label="mAP@[.5:.95] %",
        higher_is_better=True,
        model_metrics=(("map", "mAP@[.5:.95] %"), ("ap50", "AP50 %")),
        val_metric_keys=("val_map", "val_ap50"),
        gates=DETECTION_GATES,
        # predict and triton serve a detection run without asking (deploy.task_serving).
        deploy_skip_reason="quantize and export-data are not built for detectors yet (issue 19)",
        ready_actions=("export", "validate", "bench"),
    ),
}


def task_named(name: object, source: str = "config key task") -> TaskSpec:
    """The TaskSpec called `name`; a UsageError naming `source` and the known tasks otherwise."""
    if not isinstance(name, str) or name not in TASKS:
        raise UsageError(f"{source}: {name!r} is not one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(manifest: Mapping[str, Any], source: str = "manifest") -> TaskSpec:
    """The task a manifest records ("task"); manifests without one are classification (older runs)."""
    return task_named(manifest.get("task", DEFAULT_TASK), f"{source}: task")


def run_task(run_dir: str | os.PathLike[str]) -> TaskSpec | None:
    """The task a run directory's manifest records, or None where there is no readable manifest (a
    model file rather than a run, a missing or broken manifest: each command reports those itself,
    in its own words, when it reads the run)."""
    path = run_layout.run_path(run_dir, run_layout.MANIFEST)
    try:
        data = parse_json(path.read_text(encoding="utf-8"))  # never a RecursionError on deep nesting
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return task_of(data, str(path)) if isinstance(data, dict) else None


def require_deployable_run(run_dir: str | os.PathLike[str], action: str) -> None:
    """Raise UsageError, before any work, when `run_dir` holds a run of a task that has no `action`
    (export, validate, bench, ...) yet; see `run_task` for what passes unread."""
    spec = run_task(run_dir)
    if spec is not None and not spec.is_ready(action):
        raise UsageError(
            f"{run_dir}: a {spec.name} run; {action} is not available: {spec.deploy_skip_reason}"
        )
