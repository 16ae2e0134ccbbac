"""The optimizer and the per-step schedules: learning rate and the distillation weight's warm-up.

Both schedules are pure functions of the global optimizer step, so a resumed run recomputes them
from the step it resumes at, and a LambdaLR over `lr_factor` is all the scheduler state there is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from reviewkd.config import Config


def make_optimizer(config: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum, fused where torch has it) or AdamW over `params`, from config.optim."""
    oc = config.optim
    if oc.name == "adamw":
        return torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay)
    settings: dict[str, Any] = {
        "lr": oc.lr,
        "momentum": oc.momentum,
        "nesterov": oc.nesterov and oc.momentum > 0,
        "weight_decay": oc.weight_decay,
    }
    # The fused kernel is one pass over the parameters instead of several; torch versions or devices
    # without it reject fused=True when the optimizer is built, and then the plain loop is used.
    try:
        return torch.optim.SGD(params, fused=True, **settings)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(params, **settings)


def lr_factor(config: Config, step: int, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based, counted over the whole run)."""
    sc = config.schedule
    if sc.name == "step":
        epoch = step // steps_per_epoch
        return float(sc.gamma ** sum(1 for m in sc.milestones if epoch >= m))
    total = max(1, config.train.epochs * steps_per_epoch)
    floor = sc.min_lr / config.optim.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def distill_scale(config: Config, step: int, steps_per_epoch: int) -> float:
    """The warm-up factor of the distillation terms: linear from 0 to 1 over method.warmup_epochs."""
    warmup_steps = config.method.warmup_epochs * steps_per_epoch
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
