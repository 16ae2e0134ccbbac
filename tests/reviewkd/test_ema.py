"""reviewkd/ema.py: the moving average of the student's weights, checked against a hand computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reviewkd.ema import WeightAverage


def _net(weight: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(weight)
    return net


def test_the_average_follows_the_ramped_decay_and_copies_integer_buffers() -> None:
    net = _net(0.0)
    average = WeightAverage(net, decay=0.5)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0]):
        with torch.no_grad():
            net[0].weight.fill_(value)
        net[1].num_batches_tracked += 3
        decay = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.1818..., 0.25, 0.3077..., capped at 0.5
        expected = decay * expected + (1 - decay) * value
        average.update(net)
        assert average.weights["0.weight"].item() == pytest.approx(expected, rel=1e-6)
    assert average.updates == 4
    assert int(average.weights["1.num_batches_tracked"]) == 12
    assert average.current_decay() == pytest.approx(5 / 14)  # still ramping: (1 + 4) / (10 + 4)
    average.updates = 100
    assert average.current_decay() == 0.5  # the configured decay caps the ramp


def test_applied_swaps_the_average_in_and_the_live_weights_back() -> None:
    net = _net(1.0)
    average = WeightAverage(net, decay=0.9)
    with torch.no_grad():
        net[0].weight.fill_(5.0)
    with average.applied(net):
        assert net[0].weight.item() == 1.0
        assert net(torch.ones(2, 1)).shape == (2, 1)
    assert net[0].weight.item() == 5.0


def test_state_dict_round_trip_and_bad_decay() -> None:
    net = _net(1.0)
    average = WeightAverage(net, decay=0.9)
    with torch.no_grad():
        net[0].weight.fill_(3.0)
    average.update(net)
    restored = WeightAverage(_net(7.0), decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 1
    assert torch.equal(restored.weights["0.weight"], average.weights["0.weight"])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="EMA decay"):
            WeightAverage(net, decay=bad)
