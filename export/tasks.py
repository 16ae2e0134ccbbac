"""export per task: the tasks whose export is their own module's, not export.pipeline.export_run's.

Classification's export is export.pipeline.export_run; a task listed in OWN_EXPORT brings its own
(arguments: run, formats, calib_samples, calib_method, opset, log), which `reviewkd export` and
`reviewkd run` call through `own_export` instead of asking for the task by name. Each is imported
when called: the CLI imports this module for every command, and a detection export needs torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from deploy.optional import optional_import
from deploy.tasks import DETECTION, run_task
from export.pipeline import ExportSummary


def _export_detection(*args: Any, **kwargs: Any) -> ExportSummary:
    """export.detection_pipeline.export_detection_run, imported now."""
    with optional_import("exporting a detection run"):
        from export.detection_pipeline import export_detection_run

    return export_detection_run(*args, **kwargs)


OWN_EXPORT: dict[str, Callable[..., ExportSummary]] = {DETECTION: _export_detection}


def own_export(run_dir: str | os.PathLike[str]) -> Callable[..., ExportSummary] | None:
    """The export of the run's task where it has its own, else None (export_run applies)."""
    spec = run_task(run_dir)
    return OWN_EXPORT.get(spec.name) if spec is not None else None
