"""The training checkpoint, checkpoints/last.pt: `TrainState`, its atomic save and its safe load.

A checkpoint holds exactly the fields of TrainState, plus a format number. Every value is a tensor
or a plain Python type, so it loads with torch.load(weights_only=True) and never unpickles code.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import atomic_output
from reviewkd.models.weights import describe_torch_load_error

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = Path(run_layout.CHECKPOINT)


@dataclass
class TrainState:
    """Where a training run stands and everything it needs to continue bit-exactly.

    `epoch` epochs are complete; `step` optimizer steps of the next epoch are done too (0 at an
    epoch boundary), with `aug_state` the augmentation generator's state after them and `accum`
    that partial epoch's running sums (EpochSums.to_accum). `best` is the best epoch so far:
    {"top1", "top5", "epoch", "state"} with the student's weights, or None before the first epoch.
    `ema` is the moving average of the student's weights (WeightAverage.state_dict) when
    train.ema_decay is on; a checkpoint written before it existed has none.
    """

    epoch: int
    step: int
    aug_state: torch.Tensor | None
    accum: dict[str, Any]
    student: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    best: dict[str, Any] | None
    config: dict[str, Any]
    ema: dict[str, Any] | None = None


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state_dict (safe to keep while training goes on)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors and plain types (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNG states captured by capture_rng_state (CUDA ones only on the same GPU count)."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_scaler_state(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    """Restore a GradScaler from a checkpoint written with train.amp possibly different.

    A disabled scaler (no fp16) saves {}; an enabled one refuses to load that. So a run resumed with
    train.amp changed to fp16 starts its scaler fresh, and one changed away from fp16 ignores the saved
    scale.
    """
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)


def save_checkpoint(path: Path, state: TrainState) -> None:
    """Write `state` to `path` atomically: a kill leaves the previous checkpoint or this one."""
    data = {"format": CHECKPOINT_FORMAT}
    data.update({f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)})
    with atomic_output(path) as tmp:
        torch.save(data, tmp)


def load_checkpoint(path: Path) -> TrainState:
    """Read a last.pt with weights_only=True; a damaged or foreign file is a UsageError naming it."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle or zip
        raise UsageError(f"{path}: cannot read the checkpoint ({describe_torch_load_error(exc)})") from exc
    fields = dataclasses.fields(TrainState)
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT or not required <= set(data):
        raise UsageError(f"{path}: not a reviewkd training checkpoint (format {CHECKPOINT_FORMAT})")
    return TrainState(**{f.name: data[f.name] for f in fields if f.name in data})
