"""Attention based fusion (ABF) and the review chain, docs/METHOD.md sections 1.1 and 1.2."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MAX_MID_CHANNELS = 512


def _resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="nearest")


class ABF(nn.Module):
    """One level of the review chain: project a student feature, fuse the deeper residual, map to
    the teacher's channels and size.

    Args:
        in_channels: channels of the student feature S_i.
        mid_channels: M, the width of the residual chain.
        out_channels: channels of the teacher feature T_i.
        fuse: whether a residual from the next deeper level is fused (every level but the deepest).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        project = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        expand = nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_uniform_(project.weight, a=1)
        nn.init.kaiming_uniform_(expand.weight, a=1)
        self.conv1 = nn.Sequential(project, nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(expand, nn.BatchNorm2d(out_channels))
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )

    def forward(
        self, feature: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (y_i for the teacher's level, the fused map handed to the next shallower level)."""
        x = self.conv1(feature)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF: a fusing level needs the residual of the deeper level")
            size = (x.shape[-2], x.shape[-1])
            conv = self.att_conv[0]
            assert isinstance(conv, nn.Conv2d)
            weight = conv.weight
            mid = x.shape[1]
            # conv1x1([x, R]) = conv1x1(x, W_x) + conv1x1(R, W_r), and a 1x1 conv commutes with
            # nearest resizing: so the residual's half runs at the residual's own (smaller)
            # resolution and the 2M-channel concatenation is never built.
            logits = F.conv2d(x, weight[:, :mid], conv.bias) + _resize_nearest(
                F.conv2d(residual, weight[:, mid:]), size
            )
            attention = self.att_conv[1](logits)
            residual = _resize_nearest(residual, size)
            x = torch.addcmul(x * attention[:, 0:1], residual, attention[:, 1:2])
        x = _resize_nearest(x, out_size)
        return self.conv2(x), x


class ReviewChain(nn.Module):
    """The ABF modules of every level, run from the deepest level to the shallowest.

    Args:
        student_channels: C_s(i) for levels shallow to deep.
        teacher_channels: C_t(i) for the same levels.
        teacher_sizes: (H, W) of each teacher level; each output is resized to it.
        mid_channels: width of the chain; default min(512, C_s(n)).
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        teacher_sizes: Sequence[tuple[int, int]],
        mid_channels: int | None = None,
    ) -> None:
        super().__init__()
        if not (len(student_channels) == len(teacher_channels) == len(teacher_sizes)):
            raise ValueError("ReviewChain: student and teacher must have the same number of levels")
        mid = mid_channels if mid_channels is not None else min(MAX_MID_CHANNELS, student_channels[-1])
        deepest = len(student_channels) - 1
        self.abfs = nn.ModuleList(
            ABF(c_s, mid, c_t, fuse=level != deepest)
            for level, (c_s, c_t) in enumerate(zip(student_channels, teacher_channels, strict=True))
        )
        self.teacher_sizes = [tuple(size) for size in teacher_sizes]
        self.mid_channels = mid

    def forward(
        self, student_feats: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[torch.Tensor]:
        """Map student features (shallow to deep) to teacher-shaped features (shallow to deep).

        `sizes`, when given, replaces `teacher_sizes` for this call: a detector's maps follow each
        batch's padded image size, so its teacher's sizes are only known per batch.
        """
        out_sizes = self.teacher_sizes if sizes is None else sizes
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(self.abfs)
        residual: torch.Tensor | None = None
        for level in range(len(self.abfs) - 1, -1, -1):
            height, width = out_sizes[level]
            outputs[level], residual = self.abfs[level](student_feats[level], residual, (height, width))
        return outputs
