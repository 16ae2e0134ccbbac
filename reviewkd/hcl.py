"""Hierarchical context loss (HCL), docs/METHOD.md section 1.3."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PYRAMID_SIZES = (4, 2, 1)


def _pooled_pyramid(diff: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Adaptive-average-pool `diff` to each k x k in `sizes` (descending), reusing coarser work.

    Where the previous level's grid divides evenly (k_prev % k == 0 and the map divided evenly
    into k_prev bins) a k x k pool is the mean of k_prev/k blocks of the previous pool, which
    avoids a second pass over the full-resolution map.
    """
    height, width = diff.shape[-2:]
    pooled: list[torch.Tensor] = []
    previous: torch.Tensor | None = None
    previous_exact = False
    for size in sizes:
        if previous is not None and previous_exact and previous.shape[-1] % size == 0:
            factor = previous.shape[-1] // size
            current = F.avg_pool2d(previous, kernel_size=factor) if factor > 1 else previous
        else:
            current = F.adaptive_avg_pool2d(diff, (size, size))
            previous_exact = height % size == 0 and width % size == 0
        pooled.append(current)
        previous = current
    return pooled


def hcl_level(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """HCL of one level: full-resolution MSE plus weighted MSE of 4x4, 2x2, 1x1 average pools.

    Levels with k >= min(H, W) are skipped; weights are 1/2, 1/4, 1/8 in order of the levels
    used, and the sum is divided by 1 + the weights used. Because average pooling is linear,
    mse(pool(s), pool(t)) = mean(pool(s - t)^2), so the pyramid pools the difference once.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"hcl_loss: student feature {tuple(student.shape)} and teacher feature "
            f"{tuple(teacher.shape)} differ in shape"
        )
    # In float32 even under bf16 autocast: a no-op at fp32, and the squared means stay accurate.
    diff = student.float() - teacher.float()
    loss = diff.pow(2).mean()
    smallest_side = min(diff.shape[-2:])
    sizes = [k for k in PYRAMID_SIZES if k < smallest_side]
    weight, total = 1.0, 1.0
    for pooled in _pooled_pyramid(diff, sizes):
        weight /= 2.0
        loss = loss + weight * pooled.pow(2).mean()
        total += weight
    return loss / total


def hcl_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of `hcl_level` over paired feature maps (N, C, H, W) of equal shapes."""
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"hcl_loss: {len(student_feats)} student levels but {len(teacher_feats)} teacher levels"
        )
    if not student_feats:
        raise ValueError("hcl_loss: no feature levels given")
    total = hcl_level(student_feats[0], teacher_feats[0])
    for student, teacher in zip(student_feats[1:], teacher_feats[1:], strict=True):
        total = total + hcl_level(student, teacher)
    return total
