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


def parameter_groups(config: Config, params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """One group with optim.weight_decay; with optim.decay_norm_and_bias off, 1-d tensors (BatchNorm
    weights, biases) go to a second group without weight decay."""
    if config.optim.decay_norm_and_bias:
        return [{"params": params}]
    return [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def make_optimizer(config: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum, fused where torch has it) or AdamW over `params`, from config.optim."""
    oc = config.optim
    groups = parameter_groups(config, params)
    if oc.name == "adamw":
        return torch.optim.AdamW(groups, lr=oc.lr, weight_decay=oc.weight_decay)
    settings: dict[str, Any] = {
        "lr": oc.lr,
        "momentum": oc.momentum,
        "nesterov": oc.nesterov and oc.momentum > 0,
        "weight_decay": oc.weight_decay,
    }
    # The fused kernel is one pass over the parameters instead of several; torch versions or devices
    # without it reject fused=True when the optimizer is built, and then the plain loop is used.
    try:
        return torch.optim.SGD(groups, fused=True, **settings)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(groups, **settings)


def warmup_steps(config: Config, steps_per_epoch: int) -> float:
    """The learning-rate warm-up in optimizer steps (schedule.warmup_epochs or warmup_fraction)."""
    sc = config.schedule
    if sc.warmup_fraction:
        return sc.warmup_fraction * config.train.epochs * steps_per_epoch
    return sc.warmup_epochs * steps_per_epoch


def _cosine(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at progress 1 along half a cosine."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _one_cycle(config: Config, step: int, total: int, warmup: float) -> float:
    """torch.optim.lr_scheduler.OneCycleLR's factor (anneal_strategy="cos", two phases) at `step`."""
    sc = config.schedule
    initial = 1.0 / sc.div_factor
    final = initial / sc.final_div_factor
    peak_step = (warmup if warmup > 0 else 0.3 * total) - 1.0
    if step <= peak_step:
        return _cosine(initial, 1.0, step / peak_step)
    return _cosine(1.0, final, (step - max(peak_step, 0.0)) / max(total - 1.0 - max(peak_step, 0.0), 1.0))


def lr_factor(config: Config, step: int, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based, counted over the whole run)."""
    sc = config.schedule
    total = max(1, config.train.epochs * steps_per_epoch)
    warmup = warmup_steps(config, steps_per_epoch)
    if sc.name == "onecycle":
        return _one_cycle(config, step, total, warmup)
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if sc.name == "step":
        epoch = step // steps_per_epoch
        return ramp * float(sc.gamma ** sum(1 for m in sc.milestones if epoch >= m))
    floor = sc.min_lr / config.optim.lr
    return ramp * _cosine(1.0, floor, (step - warmup) / max(total - warmup, 1.0))


def distill_scale(config: Config, step: int, steps_per_epoch: int) -> float:
    """The warm-up factor of the distillation terms: linear from 0 to 1 over method.warmup_epochs."""
    warmup_steps = config.method.warmup_epochs * steps_per_epoch
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
