"""Run an exported detection ONNX file with ONNX Runtime, as deployed: per-image detections out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploy.detection.outputs import Detections, check_output_names, decode_outputs
from deploy.runners.onnxruntime_runner import open_session_on, session_device


class DetectionSession:
    """One ONNX Runtime session on a detection file, its outputs checked against the contract when
    it opens (a UsageError naming the file otherwise), on `device` ("cpu" or "cuda") as
    `open_session_on` opens it: an ONNX Runtime CPU int8 file runs on the CPU whatever `device` says."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_classes: int,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.num_classes = num_classes
        self.session: Any
        self.session, self.embedded = open_session_on(self.path, device, threads=threads)
        self.device = session_device(self.session)  # where it runs: the CPU for an integer-kernel file
        check_output_names([output.name for output in self.session.get_outputs()], str(self.path))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def raw(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The four outputs of one batch, by name."""
        values = self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(self.output_names, values, strict=True))

    def detect(self, images: np.ndarray) -> list[Detections]:
        """Each image's detections for one batch [B, 3, H, W]."""
        return decode_outputs(self.raw(images), str(self.path), self.num_classes)


def detect_onnx(
    path: str | os.PathLike[str], batches: Sequence[np.ndarray], num_classes: int, device: str = "cpu"
) -> tuple[list[Detections], str]:
    """Every image's detections by the file at `path` opened on `device` (`DetectionSession`), over
    `batches`, in order; and the device it ran on (`DetectionSession.device`)."""
    session = DetectionSession(path, num_classes, device)
    return [found for batch in batches for found in session.detect(batch)], session.device
