"""An exponential moving average (EMA) of the student's weights, evaluated and kept instead of them.

After every optimizer step, every floating-point entry of the student's state_dict (weights and
BatchNorm statistics alike) moves towards the live value: avg <- d * avg + (1 - d) * live; integer
buffers (BatchNorm's batch counter) are copied. The decay ramps up as d = min(decay, (1 + n) /
(10 + n)) after n updates, so the average of a short run is not dominated by its random start.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The EMA of one module's state_dict; `applied` swaps it into the module for a while."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.weights = {name: value.detach().clone() for name, value in module.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next update uses: the configured one, ramped up over the first updates."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average one step towards `module`'s current weights."""
        weight = 1.0 - self.current_decay()
        live = module.state_dict()
        for name, average in self.weights.items():
            if average.is_floating_point():
                average.lerp_(live[name].detach(), weight)
            else:
                average.copy_(live[name])
        self.updates += 1

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Run the block with the averaged weights loaded into `module`; its own come back after."""
        own = {name: value.detach().clone() for name, value in module.state_dict().items()}
        module.load_state_dict(self.weights)
        try:
            yield
        finally:
            module.load_state_dict(own)

    def state_dict(self) -> dict[str, Any]:
        """The average, its decay and its update count, as CPU tensors and plain types."""
        return {
            "decay": self.decay,
            "updates": self.updates,
            "weights": {name: value.detach().cpu().clone() for name, value in self.weights.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output (onto this average's device)."""
        self.updates = int(state["updates"])
        for name, value in state["weights"].items():
            self.weights[name].copy_(value)
