"""The outcome of one measurement or check, as every result file and report spells it."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """A str enum, so JSON files keep the plain strings ("ok", "failed", ...) and compare equal to them."""

    OK = "ok"
    FAILED = "failed"  # it ran and failed a gate, or it broke
    SKIPPED = "skipped"  # it cannot run on this machine (no TensorRT, no GPU, no torch)
    NOT_MEASURED = "not measured"  # nobody asked for it yet
    INCONCLUSIVE = "inconclusive"  # a gate whose sample cannot resolve its budget (deploy.paired_stats)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
