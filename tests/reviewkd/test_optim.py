"""The optimizer and schedules: one-cycle equals torch's OneCycleLR, linear warm-ups, weight-decay groups."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from reviewkd.config import load_config
from reviewkd.optim import distill_scale, lr_factor, make_optimizer

STEPS_PER_EPOCH = 7
NO_WARMUP = "schedule.warmup_epochs=0"  # the embedded default warms up for one epoch


@pytest.mark.parametrize(
    ("warmup", "pct_start"),
    [("schedule.warmup_fraction=0.15", 0.15), ("schedule.warmup_epochs=2", 2 / 10), ("train.seed=0", 0.3)],
)
def test_onecycle_is_torch_onecyclelr(warmup: str, pct_start: float) -> None:
    config = load_config(
        None, [NO_WARMUP, "schedule.name=onecycle", warmup, "optim.lr=0.1", "train.epochs=10"]
    )
    total = 10 * STEPS_PER_EPOCH
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.1, total_steps=total, pct_start=pct_start, cycle_momentum=False
    )
    for step in range(total):
        assert 0.1 * lr_factor(config, step, STEPS_PER_EPOCH) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-15
        ), step
        optimizer.step()
        reference.step()


def test_cosine_with_a_linear_warmup() -> None:
    config = load_config(
        None, ["schedule.name=cosine", "schedule.warmup_epochs=1", "train.epochs=4", "schedule.min_lr=0.001"]
    )
    factors = [lr_factor(config, s, STEPS_PER_EPOCH) for s in range(4 * STEPS_PER_EPOCH)]
    ramp = [(s + 1) / STEPS_PER_EPOCH for s in range(STEPS_PER_EPOCH)]
    assert factors[:STEPS_PER_EPOCH] == pytest.approx(ramp)  # linear, reaching the full lr
    after = factors[STEPS_PER_EPOCH:]
    assert all(a >= b for a, b in itertools.pairwise(after))  # then only down
    assert lr_factor(config, 4 * STEPS_PER_EPOCH, STEPS_PER_EPOCH) == pytest.approx(0.001 / config.optim.lr)
    # Without a warm-up, cosine starts at the full rate, as before.
    plain = load_config(None, [NO_WARMUP, "schedule.name=cosine", "train.epochs=4"])
    assert lr_factor(plain, 0, STEPS_PER_EPOCH) == 1.0
    assert lr_factor(plain, 2 * STEPS_PER_EPOCH, STEPS_PER_EPOCH) == pytest.approx(0.5)


def test_step_schedule_with_a_warmup_fraction() -> None:
    config = load_config(
        None,
        [
            NO_WARMUP,
            "schedule.name=step",
            "schedule.milestones=[2]",
            "schedule.warmup_fraction=0.25",
            "train.epochs=4",
        ],
    )
    warmup = 0.25 * 4 * STEPS_PER_EPOCH  # 7 steps
    assert lr_factor(config, 0, STEPS_PER_EPOCH) == pytest.approx(1 / warmup)
    assert lr_factor(config, STEPS_PER_EPOCH, STEPS_PER_EPOCH) == 1.0
    assert lr_factor(config, 2 * STEPS_PER_EPOCH, STEPS_PER_EPOCH) == pytest.approx(0.1)


def test_distillation_weight_warms_up_over_its_epochs() -> None:
    config = load_config(None, ["method.warmup_epochs=2"])
    assert distill_scale(config, 0, STEPS_PER_EPOCH) == 0.0
    assert distill_scale(config, STEPS_PER_EPOCH, STEPS_PER_EPOCH) == 0.5
    assert distill_scale(config, 5 * STEPS_PER_EPOCH, STEPS_PER_EPOCH) == 1.0


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_can_spare_norms_and_biases(name: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    params = list(model.parameters())
    spared = make_optimizer(
        load_config(
            None, [f"optim.name={name}", "optim.decay_norm_and_bias=false", "optim.weight_decay=0.1"]
        ),
        params,
    )
    decay, no_decay = spared.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # conv bias, BN w/b, fc bias
    # With zero gradients only weight decay moves a parameter: the BN weight stays, the conv weight shrinks.
    bn_weight, conv_weight = model[1].weight, model[0].weight
    before_bn, before_conv = bn_weight.detach().clone(), conv_weight.detach().clone()
    for p in params:
        p.grad = torch.zeros_like(p)
    spared.step()
    assert torch.equal(bn_weight, before_bn)
    assert not torch.equal(conv_weight, before_conv)
    (everything,) = make_optimizer(load_config(None, [f"optim.name={name}"]), params).param_groups
    assert len(everything["params"]) == len(params) and not math.isnan(everything["weight_decay"])
