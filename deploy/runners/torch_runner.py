"""PyTorch backend: an already built nn.Module behind the runner contract.

`deploy` cannot build models (that needs the model zoo in `reviewkd`); the command layer builds
the module and hands it here. This is the only module of `deploy` that imports torch, and nothing
in `deploy` imports it at import time, so serving devices without torch are unaffected.

On a CUDA device the runner can replay each batch shape as a CUDA graph (`use_cuda_graphs = True`):
the per-shape warm-up, capture and replay, and the fallback when a capture fails, are
`CudaGraphCache`'s; this module only says how to capture and replay a module.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deploy.errors import MissingDependencyError, UsageError
from deploy.runners.base import Runner
from deploy.runners.cuda_graphs import CudaGraphCache, CudaGraphReporting

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
# Eager runs on the capture stream before capturing, as torch's CUDA-graph docs require: they do
# the lazy set-up (cuDNN/cuBLAS handles and workspaces, allocator blocks) that a capture forbids.
_SIDE_STREAM_WARMUP = 3


@dataclass
class _TorchGraph:
    """A captured forward pass at one batch shape and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: torch.Tensor


class TorchRunner(CudaGraphReporting, Runner):
    """Runs a PyTorch classifier in eval mode under inference_mode, on the CPU or a CUDA GPU.

    The runner keeps its own copy of the module, so casting to fp16 or moving to the GPU never
    changes the caller's model. fp16 casts weights and inputs; logits come back as float32.

    `infer` is thread-safe: calls from several threads run one at a time.

    CUDA graphs: on device "cuda", `use_cuda_graphs = True` replays one captured graph per
    batch shape (see `CudaGraphCache`); on the CPU there are none, so `supports_cuda_graphs` is
    False and turning them on is a UsageError. `cuda_graph_error` says why a capture failed.
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
        self._use_cuda_graphs = False
        self._graphs: CudaGraphCache[_TorchGraph] = CudaGraphCache(_free_graph)
        self._capture_stream: torch.cuda.Stream | None = None
        # One call at a time: the CUDA graphs of all calls share their static input and output tensors.
        self._lock = threading.Lock()

    @property
    def supports_cuda_graphs(self) -> bool:
        """True on a CUDA device, the only place a CUDA graph can be captured."""
        return self.device == "cuda"

    @property
    def use_cuda_graphs(self) -> bool:
        """Whether calls replay a captured CUDA graph per batch shape (off by default)."""
        return self._use_cuda_graphs

    @use_cuda_graphs.setter
    def use_cuda_graphs(self, value: bool) -> None:
        if value and not self.supports_cuda_graphs:
            raise UsageError(f"{self.name}: CUDA graphs need device 'cuda'; this runner runs on the CPU")
        self._use_cuda_graphs = bool(value)

    def _infer(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._infer_locked(images)

    def _infer_locked(self, images: np.ndarray) -> np.ndarray:
        module = self._module
        if module is None:
            raise UsageError(f"{self.name}: used after close()")
        with torch.inference_mode():
            if not self._use_cuda_graphs:
                return self._eager(module, images)
            return self._graphs.run(
                images.shape,
                eager=lambda: self._eager(module, images),
                capture=lambda: self._capture(module, self._to_device(images)),
                replay=lambda graph: self._replay(graph, images),
            )

    def _to_device(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).to(device=self.device, dtype=self._dtype)

    def _eager(self, module: nn.Module, images: np.ndarray) -> np.ndarray:
        return self._forward(module, self._to_device(images)).float().cpu().numpy()

    def _forward(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = module(batch)
        if not isinstance(logits, torch.Tensor):
            raise UsageError(
                f"{self.name}: the model returned {type(logits).__name__}; expected a logits tensor"
            )
        return logits

    def _capture(self, module: nn.Module, batch: torch.Tensor) -> _TorchGraph:
        """Capture `module` with `batch` as its static input, warmed up first on the capture stream."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream()
        stream = self._capture_stream
        static_input = batch
        # The static input was written on the current stream; the side stream must see it.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(_SIDE_STREAM_WARMUP):
                self._forward(module, static_input)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # Captured on the stream the warm-up ran on, so the handles it created are the ones recorded.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            static_output = self._forward(module, static_input)
        return _TorchGraph(graph, static_input, static_output)

    def _replay(self, graph: _TorchGraph, images: np.ndarray) -> np.ndarray:
        # copy_ casts to the model's dtype exactly as the eager path's .to() does.
        graph.static_input.copy_(torch.from_numpy(images))
        graph.graph.replay()
        return graph.static_output.float().cpu().numpy()

    def synchronize(self) -> None:
        """Wait for the GPU to finish queued kernels (a no-op on the CPU)."""
        if self.device == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        """Drop the module copy and, on the GPU, return its cached memory to the driver."""
        with self._lock:
            if self._module is None:
                return
            self._graphs.clear()
            self._capture_stream = None
            self._module = None
            if self.device == "cuda":
                torch.cuda.empty_cache()


def _free_graph(graph: _TorchGraph) -> None:
    """Release a graph's private memory pool; its static tensors go with the last reference."""
    torch.cuda.synchronize()
    graph.graph.reset()
