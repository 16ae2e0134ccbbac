"""ReviewKD for detectors, as the paper's detection setup, and the plain detector baseline.

The review chain of ABF modules (reviewkd.abf) runs over the student's feature levels (the FPN
levels), coarsest first, and HCL (reviewkd.hcl) compares each of its outputs with the teacher's
level of the same rank; the detector's own losses are added beside it. Level widths come from the
detectors' probed `feature_levels` and sizes from a probe forward of the teacher, so teacher and
student FPNs may differ in width; at every step the chain's outputs are resized to the teacher's
maps of that batch (a detector's maps follow each batch's padded, possibly non-square size).

Both distillers follow reviewkd.distiller's contract: the teacher stays frozen in eval mode whatever
`.train()` is called with, `.student` is the bare Detector (it holds no ABF), `.head` holds what is
thrown away after training, and `forward(images, targets)` returns named losses with "loss" their
weighted sum.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from deploy.errors import UsageError
from reviewkd.abf import ReviewChain
from reviewkd.detection.models import Detector
from reviewkd.distiller import Distiller
from reviewkd.hcl import hcl_loss
from reviewkd.taps import pair_default_taps

Targets = Sequence[dict[str, torch.Tensor]]


def _detection_losses(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The detector's own loss terms, and their sum as "detection"."""
    total = torch.stack([value for value in losses.values()]).sum()
    return {"detection": total, **losses}


class PlainDetection(Distiller):
    """The baseline: the student detector trained alone on its own losses."""

    def __init__(self, student: Detector) -> None:
        super().__init__(student, None)

    def forward(self, images: Any, targets: Targets) -> dict[str, torch.Tensor]:
        terms = _detection_losses(self.student(images, targets))
        return {"loss": terms["detection"], **terms}


class DetectionReviewKD(Distiller):
    """ReviewKD between two Detectors over their backbone levels (see the module docstring).

    Args:
        student, teacher: Detectors (reviewkd.detection.models); the teacher's weights should be
            loaded before, and are frozen here.
        image_size: (H, W) of the probe image that finds the teacher's level sizes.
        hcl_weight: lambda, the weight of HCL beside the detection losses.
        student_levels, teacher_levels: keys of the paired levels in each backbone's output,
            finest first; by default every level of each, and where their counts differ the
            deepest levels pair (as reviewkd.taps.pair_default_taps does for classifiers).
        mid_channels: width of the review chain; default min(512, the student's coarsest level).
    """

    def __init__(
        self,
        student: Detector,
        teacher: Detector,
        image_size: tuple[int, int],
        hcl_weight: float = 1.0,
        student_levels: Sequence[str] | None = None,
        teacher_levels: Sequence[str] | None = None,
        mid_channels: int | None = None,
    ) -> None:
        super().__init__(student, teacher)
        self.hcl_weight = hcl_weight
        student_keys = list(student_levels) if student_levels else [lv.key for lv in student.feature_levels]
        teacher_keys = list(teacher_levels) if teacher_levels else [lv.key for lv in teacher.feature_levels]
        if not student_levels and not teacher_levels:
            student_keys, teacher_keys = pair_default_taps(student_keys, teacher_keys)
        for detector, keys in ((student, student_keys), (teacher, teacher_keys)):
            known = [level.key for level in detector.feature_levels]
            unknown = [key for key in keys if key not in known]
            if unknown:
                raise UsageError(
                    f"detector {detector.name} has no feature level '{unknown[0]}';"
                    f" its levels: {', '.join(known)}"
                )
        if len(student_keys) != len(teacher_keys):
            raise UsageError(
                f"cannot pair student {student.name} levels {student_keys} with teacher {teacher.name}"
                f" levels {teacher_keys}: {len(student_keys)} levels vs {len(teacher_keys)};"
                " name lists of equal length"
            )
        self.student_keys = student_keys
        self.teacher_keys = teacher_keys
        channels = {level.key: level.channels for level in student.feature_levels}
        teacher_channels = {level.key: level.channels for level in teacher.feature_levels}
        with torch.no_grad():
            parameter = next(iter(teacher.parameters()))
            probe = teacher.features(torch.zeros((1, 3, *image_size), device=parameter.device))
        self.head = ReviewChain(
            student_channels=[channels[key] for key in student_keys],
            teacher_channels=[teacher_channels[key] for key in teacher_keys],
            teacher_sizes=[(int(probe[key].shape[-2]), int(probe[key].shape[-1])) for key in teacher_keys],
            mid_channels=mid_channels,
        )

    def _student_losses_and_levels(
        self, images: Any, targets: Targets
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The student's own losses, and its backbone's levels from the same forward pass."""
        captured: dict[str, OrderedDict[str, torch.Tensor]] = {}

        def record(_module: torch.nn.Module, _inputs: Any, output: OrderedDict[str, torch.Tensor]) -> None:
            captured["levels"] = output

        handle = self.student.get_submodule("model.backbone").register_forward_hook(record)
        try:
            losses = self.student(images, targets)
        finally:
            handle.remove()
        return losses, [captured["levels"][key] for key in self.student_keys]

    def forward(self, images: Any, targets: Targets) -> dict[str, torch.Tensor]:
        assert isinstance(self.teacher, Detector)
        with torch.no_grad():
            teacher_levels = self.teacher.features(images)
        teacher_feats = [teacher_levels[key] for key in self.teacher_keys]
        losses, student_feats = self._student_losses_and_levels(images, targets)
        assert isinstance(self.head, ReviewChain)
        reviewed = self.head(student_feats, [(int(t.shape[-2]), int(t.shape[-1])) for t in teacher_feats])
        hcl = hcl_loss(reviewed, teacher_feats)
        terms = _detection_losses(losses)
        loss = terms["detection"] + self.distill_scale * self.hcl_weight * hcl
        return {"loss": loss, "hcl": hcl, **terms}
