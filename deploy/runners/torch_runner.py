"""PyTorch backend: an already built nn.Module behind the runner contract.

`deploy` cannot build models (that needs the model zoo in `reviewkd`); the command layer builds
the module and hands it here. This is the only module of `deploy` that imports torch, and nothing
in `deploy` imports it at import time, so serving devices without torch are unaffected.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from deploy.errors import MissingDependencyError, UsageError
from deploy.runners.base import Runner

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}


class TorchRunner(Runner):
    """Runs a PyTorch classifier in eval mode under inference_mode, on the CPU or a CUDA GPU.

    The runner keeps its own copy of the module, so casting to fp16 or moving to the GPU never
    changes the caller's model. fp16 casts weights and inputs; logits come back as float32.
    """

    backend = "torch"

    def __init__(
        self,
        module: nn.Module,
        input_shape: tuple[int, int, int],
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        if precision not in _DTYPES:
            raise UsageError(f"torch precision: expected one of {', '.join(_DTYPES)}, got {precision!r}")
        if device not in ("cpu", "cuda"):
            raise UsageError(f"torch device: expected 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise MissingDependencyError(
                f"torch {torch.__version__} sees no CUDA GPU;"
                " run on a machine with an NVIDIA GPU and a CUDA build of torch"
            )
        if len(input_shape) != 3:
            raise UsageError(f"torch input_shape: expected (C, H, W), got {tuple(input_shape)}")
        self.precision = precision
        self.device = device
        self.input_shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
        self._dtype = _DTYPES[precision]
        self._module: nn.Module | None = copy.deepcopy(module).eval().to(device=device, dtype=self._dtype)

    def _infer(self, images: np.ndarray) -> np.ndarray:
        if self._module is None:
            raise UsageError(f"{self.name}: used after close()")
        with torch.inference_mode():
            batch = torch.from_numpy(images).to(device=self.device, dtype=self._dtype)
            logits = self._module(batch)
            if not isinstance(logits, torch.Tensor):
                raise UsageError(
                    f"{self.name}: the model returned {type(logits).__name__}; expected a logits tensor"
                )
            return logits.float().cpu().numpy()

    def synchronize(self) -> None:
        """Wait for the GPU to finish queued kernels (a no-op on the CPU)."""
        if self.device == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        """Drop the module copy and, on the GPU, return its cached memory to the driver."""
        if self._module is None:
            return
        self._module = None
        if self.device == "cuda":
            torch.cuda.empty_cache()
