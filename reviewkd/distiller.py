"""Distillers: the student, a frozen teacher and the training-only head, returning named losses.

Every distiller keeps its teacher in eval mode with no gradients whatever `.train()` is called
with, exposes the bare student as `.student`, and keeps what trains besides the student (the
ABF modules) in `.head`, which is thrown away after training.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deploy.errors import UsageError
from reviewkd.abf import ReviewChain
from reviewkd.hcl import hcl_loss
from reviewkd.taps import FeatureTaps, default_taps, model_label, pair_default_taps, pre_activation_taps

METHODS = ("ce", "kd", "reviewkd", "reviewkd+kd")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: KL(teacher || student) of temperature-softened distributions, times T^2."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def fold_batchnorm(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """An eval-mode copy of `model` with each BatchNorm2d that reads a Conv2d's output folded into it.

    In eval mode BatchNorm is a per-channel affine map of its input, so folding it into the
    preceding convolution's weights and bias is exact up to float rounding, and saves one pass
    over every such activation. Pairs are found by a probe forward with hooks: a BatchNorm2d
    whose input is the very tensor a Conv2d returned, both run once. The folded BatchNorm becomes
    nn.Identity, so every module path (and any tap on it) stays valid. A conv whose output is
    also read by something else would change that reader's input, so the copy's logits are
    compared with the original's on a random probe and a mismatch is an error.

    The copy holds its own weights: one more teacher-sized set of parameters in memory, less the
    BatchNorm buffers. It reflects the teacher's weights when it is made.

    Raises:
        UsageError: the folded copy does not reproduce the model's logits.
    """
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    modules = dict(folded.named_modules())
    calls: Counter[str] = Counter()
    conv_outputs: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []  # so no id() is reused during the probe
    pairs: list[tuple[str, str]] = []

    def conv_hook(path: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            calls[path] += 1
            if isinstance(output, torch.Tensor):
                conv_outputs[id(output)] = path
                keep_alive.append(output)

        return hook

    def bn_hook(path: str) -> Any:
        def hook(_module: nn.Module, inputs: Any, _output: Any) -> None:
            calls[path] += 1
            source = conv_outputs.get(id(inputs[0])) if inputs else None
            if source is not None:
                pairs.append((source, path))

        return hook

    handles = []
    for path, module in modules.items():
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(conv_hook(path)))
        elif type(module) is nn.BatchNorm2d and module.track_running_stats:
            handles.append(module.register_forward_hook(bn_hook(path)))
    probe = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    parameter = next(iter(folded.parameters()), None)
    if parameter is not None:
        probe = probe.to(parameter.device)
    try:
        with torch.no_grad():
            folded(probe)
    finally:
        for handle in handles:
            handle.remove()
        keep_alive.clear()

    for conv_path, bn_path in pairs:
        if calls[conv_path] != 1 or calls[bn_path] != 1:
            continue  # a shared module: folding would change its other uses
        conv, bn = modules[conv_path], modules[bn_path]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        _replace_module(folded, conv_path, fuse_conv_bn_eval(conv, bn).requires_grad_(False))
        _replace_module(folded, bn_path, nn.Identity())

    was_training = model.training
    try:
        with torch.no_grad():
            expected, got = model.eval()(probe), folded(probe)
    finally:
        model.train(was_training)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())):
        raise UsageError(
            f"fuse_teacher: folding the BatchNorms of {model_label(model)} changes its logits "
            f"(max abs diff {float((got - expected).abs().max()):.3g}); use fuse_teacher=False"
        )
    return folded


def _replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


class Distiller(nn.Module):
    """Base class. Subclasses implement `forward(images, targets) -> dict of tensors`.

    Attributes:
        student: the bare student module that was passed in.
        teacher: the teacher (frozen), or None for the cross-entropy baseline.
        head: the training-only modules (empty for logit methods).
        distill_scale: multiplies every distillation term; set per step (warm-up).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.head: nn.Module = nn.Module()
        self.distill_scale = 1.0
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True) -> Distiller:
        """Set train mode on the student and head; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self


class CrossEntropy(Distiller):
    """The baseline: the student alone with cross-entropy."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__(student, None)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.student(images)
        ce = F.cross_entropy(logits, targets)
        return {"loss": ce, "logits": logits, "ce": ce}


class LogitKD(Distiller):
    """Hinton knowledge distillation on logits."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, kd_weight: float = 1.0, temperature: float = 4.0
    ):
        super().__init__(student, teacher)
        self.kd_weight = kd_weight
        self.temperature = temperature

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.teacher is not None
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits = self.student(images)
        ce = F.cross_entropy(logits, targets)
        kd = kd_loss(logits, teacher_logits, self.temperature)
        loss = ce + self.distill_scale * self.kd_weight * kd
        return {"loss": loss, "logits": logits, "ce": ce, "kd": kd, "teacher_logits": teacher_logits}


class ReviewKD(Distiller):
    """ReviewKD (Chen et al., CVPR 2021): the review chain of ABF modules and the HCL loss.

    Args:
        student, teacher: any classifiers; features are tapped with forward hooks.
        input_shape: (C, H, W) of one input; a probe forward on it finds every level's channels
            and spatial size, so none are written by hand and non-square inputs work.
        hcl_weight: lambda, the weight of HCL in the loss.
        student_taps, teacher_taps: module paths of the levels, shallow to deep; default
            `taps.default_taps` (stage outputs plus the pooled feature); when both are defaults
            and their level counts differ, the deepest levels pair (`taps.pair_default_taps`).
        teacher_pre_activation: read the teacher's default stage taps before the ReLU that ends
            them, as the reference code does (`taps.pre_activation_taps`); named taps are taken
            as written (a path ending in `:input` reads a module's input).
        mid_channels: width of the review chain; default min(512, channels of the deepest student level).
        kd_weight, temperature: when kd_weight > 0, Hinton KD on logits is added (reviewkd+kd).
        fuse_teacher: run the teacher's forward on `fold_batchnorm`'s copy (BatchNorm folded into
            the convolutions): exact, faster, at the cost of a second copy of the teacher's
            weights in memory. `.teacher` stays the original module; the copy is made here, so
            load the teacher's weights before building the distiller.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        input_shape: Sequence[int],
        hcl_weight: float = 1.0,
        student_taps: Sequence[str] | None = None,
        teacher_taps: Sequence[str] | None = None,
        teacher_pre_activation: bool = True,
        mid_channels: int | None = None,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        fuse_teacher: bool = False,
    ) -> None:
        super().__init__(student, teacher)
        self.hcl_weight = hcl_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        s_taps = list(student_taps) if student_taps else default_taps(student, input_shape)
        t_taps = list(teacher_taps) if teacher_taps else default_taps(teacher, input_shape)
        if not student_taps and not teacher_taps:
            s_taps, t_taps = pair_default_taps(s_taps, t_taps)
        if len(s_taps) != len(t_taps):
            raise UsageError(
                f"cannot pair student {model_label(student)} taps {s_taps} with teacher "
                f"{model_label(teacher)} taps {t_taps}: {len(s_taps)} levels vs {len(t_taps)}; "
                "set method.student_taps and method.teacher_taps to lists of equal length"
            )
        if teacher_pre_activation and not teacher_taps:
            t_taps = pre_activation_taps(teacher, t_taps, input_shape)
        self.student_taps = FeatureTaps(student, s_taps, input_shape)
        # A submodule, so .to(device / memory_format) moves it along with the teacher.
        self.teacher_fused = fold_batchnorm(teacher, input_shape) if fuse_teacher else None
        self.teacher_taps = FeatureTaps(
            self.teacher_fused if self.teacher_fused is not None else teacher, t_taps, input_shape
        )
        self.head = ReviewChain(
            student_channels=[info.channels for info in self.student_taps.info],
            teacher_channels=[info.channels for info in self.teacher_taps.info],
            teacher_sizes=[info.size for info in self.teacher_taps.info],
            mid_channels=mid_channels,
        )

    def train(self, mode: bool = True) -> ReviewKD:
        """Set train mode on the student and head; the teacher and its folded copy stay in eval mode."""
        super().train(mode)
        if self.teacher_fused is not None:
            self.teacher_fused.eval()
        return self

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_logits, teacher_feats = self.teacher_taps(images)
        logits, student_feats = self.student_taps(images)
        reviewed = self.head(student_feats)
        ce = F.cross_entropy(logits, targets)
        hcl = hcl_loss(reviewed, teacher_feats)
        loss = ce + self.distill_scale * self.hcl_weight * hcl
        out = {"loss": loss, "logits": logits, "ce": ce, "hcl": hcl, "teacher_logits": teacher_logits}
        if self.kd_weight > 0:
            kd = kd_loss(logits, teacher_logits, self.temperature)
            out["kd"] = kd
            out["loss"] = loss + self.distill_scale * self.kd_weight * kd
        return out


def build_distiller(
    method: str,
    student: nn.Module,
    teacher: nn.Module | None,
    input_shape: Sequence[int],
    **params: Any,
) -> Distiller:
    """Build the distiller for `method` ("ce", "kd", "reviewkd" or "reviewkd+kd").

    `params` are the method's hyper-parameters: hcl_weight, kd_weight, temperature,
    student_taps, teacher_taps, teacher_pre_activation, mid_channels, and the speed option
    fuse_teacher (see ReviewKD); those a method does not use are ignored.
    """
    if method not in METHODS:
        raise UsageError(f"method '{method}' is unknown; expected one of {', '.join(METHODS)}")
    if method == "ce":
        return CrossEntropy(student)
    if teacher is None:
        raise UsageError(f"method '{method}' needs a teacher")
    if method == "kd":
        return LogitKD(
            student,
            teacher,
            kd_weight=params.get("kd_weight", 1.0),
            temperature=params.get("temperature", 4.0),
        )
    return ReviewKD(
        student,
        teacher,
        input_shape,
        hcl_weight=params.get("hcl_weight", 1.0),
        student_taps=params.get("student_taps"),
        teacher_taps=params.get("teacher_taps"),
        teacher_pre_activation=params.get("teacher_pre_activation", True),
        mid_channels=params.get("mid_channels"),
        kd_weight=params.get("kd_weight", 1.0) if method == "reviewkd+kd" else 0.0,
        temperature=params.get("temperature", 4.0),
        fuse_teacher=params.get("fuse_teacher", False),
    )
