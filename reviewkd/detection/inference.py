"""A detection run's student loaded for inference, and its detections in the deployment contract's
form (deploy.detection.outputs.Detections): the reference the exported files are held to."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploy import run_layout
from deploy.detection.outputs import Detections
from deploy.errors import UsageError
from deploy.fileio import sha256_file
from reviewkd.config import load_run_config
from reviewkd.detection.engine import create_detector
from reviewkd.detection.models import Detector
from reviewkd.runtime import exact_fp32


def load_run_detector(run_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Detector:
    """The run's student detector in eval mode, its weights checked against the manifest's sha256."""
    run = Path(run_dir)
    weights = run_layout.run_path(run, run_layout.STUDENT_WEIGHTS)
    if not weights.is_file():
        raise UsageError(
            f"{weights}: no student weights; expected a run directory written by reviewkd distill"
        )
    info = manifest.get("student") or {}
    recorded = info.get("sha256")
    if recorded and recorded != sha256_file(weights):
        raise UsageError(f"{weights}: sha256 differs from the manifest's; the weights changed after training")
    config = load_run_config(run)
    detector = create_detector(
        config, info.get("arch") or config.student.arch, len(manifest["classes"]), weights
    )
    return detector.eval()


def load_run_teacher(run_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Detector | None:
    """The teacher the run's student was distilled from, in eval mode, or None where the run has none
    (method plain) or its weights file is gone or no longer the one the manifest's sha256 names: the
    teacher is only shown beside the student (the report's examples), never measured against."""
    info = manifest.get("teacher") or {}
    recorded, arch = info.get("sha256"), info.get("arch")
    if not recorded or not arch:
        return None
    candidates = [run_layout.run_path(run_dir, f"{run_layout.TEACHER_DIR}/{run_layout.TEACHER_WEIGHTS}")]
    if isinstance(info.get("weights"), str):
        candidates.append(Path(info["weights"]))
    weights = next((p for p in candidates if p.is_file() and sha256_file(p) == recorded), None)
    if weights is None:
        return None
    detector = create_detector(load_run_config(run_dir), arch, len(manifest["classes"]), weights)
    return detector.eval()


def torch_detections(
    detector: Detector, batches: Sequence[np.ndarray], device: str = "cpu"
) -> list[Detections]:
    """The detector's detections on every image of `batches` (float32 [B, 3, H, W] in 0-1), in order,
    computed on `device` ("cpu", or "cuda" on a copy of the detector, in full fp32: exact_fp32)."""
    found: list[Detections] = []
    detector = detector.eval() if device == "cpu" else copy.deepcopy(detector).eval().to(device)
    with torch.no_grad(), exact_fp32():
        for batch in batches:
            images = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
            for output in detector(list(images)):
                found.append(
                    Detections(
                        boxes=output["boxes"].float().cpu().numpy(),
                        scores=output["scores"].float().cpu().numpy(),
                        classes=output["labels"].cpu().numpy().astype(np.int64),
                    )
                )
    return found
