"""An official-style ReviewKD, the reference our implementation is timed and checked against.

It follows github.com/dvlab-research/ReviewKD: its ABF interpolates the residual at every fusing
level and concatenates it with the projected student feature; its `hcl` pools the student and the
teacher map separately at every pyramid level; the student's features are reversed and the ABF
chain runs deepest first; the teacher's stage features are its pre-activations (`preact=True`:
a residual stage's last block before its final ReLU). Our models have no `is_feat` switch, so its
features come from forward hooks on the same modules as ours.

Used by benchmarks/scripts/train_step_speed.py (the step it times) and by
tests/benchmarks/scripts/test_reference_reviewkd.py (ours computes the same losses).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reviewkd.taps import default_taps


class OfficialABF(nn.Module):
    """ABF as the reference code writes it: square shapes, the residual interpolated every time."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        project = nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False)
        expand = nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False)
        self.conv1 = nn.Sequential(project, nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(expand, nn.BatchNorm2d(out_channel))
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(project.weight, a=1)
        nn.init.kaiming_uniform_(expand.weight, a=1)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, shape: int = 0, out_shape: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            assert y is not None
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def official_hcl(fstudent: Sequence[torch.Tensor], fteacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference `hcl`: each pyramid level pools the student and the teacher map separately."""
    loss_all = torch.zeros(())
    for fs, ft in zip(fstudent, fteacher, strict=True):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (level, level))
            tmpft = F.adaptive_avg_pool2d(ft, (level, level))
            cnt /= 2.0
            loss = loss + F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


class HookedFeatures:
    """Logits plus the outputs of `taps`, recorded by forward hooks (the stand-in for is_feat).

    With `preact`, a tap on a stage of CIFAR ResNet blocks records the sum its last block hands to
    that block's final ReLU (the block's `relu2`), as the reference models' `preact=True` returns.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str], preact: bool = False) -> None:
        self.model = model
        self.taps = list(taps)
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for tap in self.taps:
            stage = modules[tap]
            last_relu = getattr(stage[-1], "relu2", None) if isinstance(stage, nn.Sequential) else None
            if preact and isinstance(last_relu, nn.ReLU):
                last_relu.register_forward_pre_hook(self._pre_hook(tap))
            else:
                stage.register_forward_hook(self._hook(tap))

    def _hook(self, tap: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            self.features[tap] = output

        return hook

    def _pre_hook(self, tap: str) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self.features[tap] = inputs[0].clone()  # the ReLU runs in place

        return hook

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        logits = self.model(x)
        feats = [self.features[tap] for tap in self.taps]
        feats = [f.view(f.shape[0], f.shape[1], 1, 1) if f.dim() == 2 else f for f in feats]
        return feats, logits


class OfficialReviewKD(nn.Module):
    """The reference ReviewKD wrapper: student features reversed, the ABF chain deepest first.

    `abfs[0]` is the deepest level's ABF, `abfs[-1]` the shallowest's (the reverse of our
    `ReviewChain.abfs`).
    """

    def __init__(
        self,
        student: nn.Module,
        taps: Sequence[str],
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        shapes: Sequence[int],
        out_shapes: Sequence[int],
        mid_channel: int,
    ) -> None:
        super().__init__()
        self.student = student
        self.hooked = HookedFeatures(student, taps)
        self.shapes = list(shapes)[::-1]
        self.out_shapes = list(out_shapes)[::-1]
        abfs = nn.ModuleList(
            OfficialABF(c, mid_channel, out_channels[i], i < len(in_channels) - 1)
            for i, c in enumerate(in_channels)
        )
        self.abfs = abfs[::-1]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats, logit = self.hooked(x)
        feats = feats[::-1]
        results = []
        out_features, res_features = self.abfs[0](feats[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(
            feats[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:], strict=True
        ):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        return results, logit


class OfficialDistillation:
    """The official-style training forward: the frozen teacher's features under torch.no_grad, the
    student through `OfficialReviewKD`, and cross-entropy plus `hcl_weight` times `official_hcl`.

    `model` holds what trains (the student and the ABF modules); hand its parameters to the optimizer.
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, input_shape: Sequence[int], hcl_weight: float
    ) -> None:
        taps_s = default_taps(student, input_shape)
        taps_t = default_taps(teacher, input_shape)
        self.teacher = HookedFeatures(teacher.eval().requires_grad_(False), taps_t, preact=True)
        self.hcl_weight = hcl_weight
        probe = torch.zeros(2, *input_shape)
        with torch.no_grad():
            t_feats, _ = self.teacher(probe)
            s_feats, _ = HookedFeatures(copy.deepcopy(student).eval(), taps_s)(probe)
        self.model = OfficialReviewKD(
            student,
            taps_s,
            in_channels=[f.shape[1] for f in s_feats],
            out_channels=[f.shape[1] for f in t_feats],
            shapes=[f.shape[-1] for f in s_feats],
            out_shapes=[f.shape[-1] for f in t_feats],
            mid_channel=min(512, s_feats[-1].shape[1]),
        )

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch (the model's train/eval mode is the caller's)."""
        with torch.no_grad():
            teacher_feats, _ = self.teacher(images)
        results, logit = self.model(images)
        return F.cross_entropy(logit, targets) + self.hcl_weight * official_hcl(results, teacher_feats)
