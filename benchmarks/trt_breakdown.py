"""A TensorRT engine's time split as trtexec splits it: host-to-device copy, GPU compute, device-to-host
copy, the host's enqueue call, and throughput, each with its distribution.

Per iteration, on one non-blocking CUDA stream, four CUDA events are recorded: before the input copy,
after it (compute starts), after the enqueue (compute ends) and after the output copy. Their spans
are H2D, GPU compute and D2H; their sum is the latency. The host times the enqueue call itself
(`execute_async_v3`, or `cudaGraphLaunch` when the work was captured as a CUDA graph). As in trtexec,
the compute span starts when the input copy ends, so a host slower to enqueue than the GPU to run
shows in it too: compare it with the enqueue time. Iterations run one at a time (each waits for its
last event), so throughput is images over the timed loop's wall time, without the overlap of
trtexec's several streams.

The loop (`time_iteration`, `run_breakdown`) and the summary (`summarize_breakdown`) are pure Python
over an `EngineOps`, which the tests fake; `CudartEngineOps` drives TensorRT 10 through cuda-python's
runtime bindings (cuda-bindings) and is checked by mypy against tensorrt-stubs (`make lint`).
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from benchmarks.machine_state import field_text, is_unknown, unknown
from benchmarks.stability import distribution, stability_verdict
from deploy.gpu import import_cudart
from deploy.optional import optional_import

if TYPE_CHECKING:
    import tensorrt as trt

# The longest breakdown per batch size: the spread of 2000 iterations is well resolved, and each costs
# five CUDA calls from Python on top of the engine.
MAX_BREAKDOWN_ITERS = 2000
PHASES: tuple[str, ...] = ("h2d_ms", "compute_ms", "d2h_ms", "latency_ms", "enqueue_ms")
# Event slots, recorded in this order each iteration.
INPUT_START, COMPUTE_START, COMPUTE_END, OUTPUT_END = range(4)


@dataclass(frozen=True)
class IterationTimes:
    """One iteration's spans in milliseconds: three on the GPU's events, the enqueue on the host."""

    h2d_ms: float
    compute_ms: float
    d2h_ms: float
    enqueue_ms: float

    @property
    def latency_ms(self) -> float:
        """Input copy start to output copy end."""
        return self.h2d_ms + self.compute_ms + self.d2h_ms


class EngineOps(Protocol):
    """What one iteration does on the stream; event `slot`s are INPUT_START ... OUTPUT_END."""

    def record(self, slot: int) -> None: ...

    def copy_inputs(self) -> None: ...

    def enqueue(self) -> None: ...

    def copy_outputs(self) -> None: ...

    def wait(self) -> None:
        """Block until the last recorded event has completed."""
        ...

    def elapsed_ms(self, start: int, end: int) -> float: ...


def time_iteration(ops: EngineOps, clock: Callable[[], int] = time.perf_counter_ns) -> IterationTimes:
    """Run one iteration with its four events and the host's enqueue timing."""
    ops.record(INPUT_START)
    ops.copy_inputs()
    ops.record(COMPUTE_START)
    started = clock()
    ops.enqueue()
    enqueue_ms = (clock() - started) / 1e6
    ops.record(COMPUTE_END)
    ops.copy_outputs()
    ops.record(OUTPUT_END)
    ops.wait()
    return IterationTimes(
        ops.elapsed_ms(INPUT_START, COMPUTE_START),
        ops.elapsed_ms(COMPUTE_START, COMPUTE_END),
        ops.elapsed_ms(COMPUTE_END, OUTPUT_END),
        enqueue_ms,
    )


def summarize_breakdown(
    iterations: Sequence[IterationTimes], batch_size: int, wall_seconds: float, cuda_graph: dict[str, Any]
) -> dict[str, Any]:
    """Each phase's distribution (benchmarks.stability.distribution), throughput in images and
    queries per second over `wall_seconds`, the share of the wall time the GPU computed, whether a
    CUDA graph ran (`cuda_graph`: {"used", "reason"}), and the stable/noisy verdict of the latency."""
    if not iterations:
        raise ValueError("summarize_breakdown needs at least one iteration")
    if wall_seconds <= 0:
        raise ValueError("summarize_breakdown needs a positive wall time")
    series = {
        "h2d_ms": [it.h2d_ms for it in iterations],
        "compute_ms": [it.compute_ms for it in iterations],
        "d2h_ms": [it.d2h_ms for it in iterations],
        "latency_ms": [it.latency_ms for it in iterations],
        "enqueue_ms": [it.enqueue_ms for it in iterations],
    }
    summary: dict[str, Any] = {"batch_size": batch_size, "iters": len(iterations), "cuda_graph": cuda_graph}
    summary.update({phase: distribution(values) for phase, values in series.items()})
    latency = summary["latency_ms"]
    summary["verdict"], summary["noisy_because"] = stability_verdict(
        len(iterations), latency["cv"], latency["p50_ms"], latency["p99_ms"]
    )
    summary["wall_seconds"] = wall_seconds
    summary["throughput_ips"] = len(iterations) * batch_size / wall_seconds
    summary["queries_per_second"] = len(iterations) / wall_seconds
    summary["gpu_compute_share"] = sum(series["compute_ms"]) / (1000.0 * wall_seconds)
    return summary


def run_breakdown(
    ops: EngineOps,
    batch_size: int,
    *,
    warmup: int,
    iters: int,
    cuda_graph: dict[str, Any],
    clock: Callable[[], int] = time.perf_counter_ns,
) -> dict[str, Any]:
    """`warmup` untimed iterations, then `iters` timed ones, summarised (`summarize_breakdown`)."""
    if iters < 1:
        raise ValueError(f"a breakdown needs at least one timed iteration, got {iters}")
    for _ in range(warmup):
        time_iteration(ops, clock)
    started = clock()
    iterations = [time_iteration(ops, clock) for _ in range(iters)]
    return summarize_breakdown(iterations, batch_size, (clock() - started) / 1e9, cuda_graph)


def breakdown_text(summary: Mapping[str, Any]) -> str:
    """`phase_text` of a breakdown, or "unknown (why)" for one that could not run."""
    return field_text(summary) if is_unknown(summary) else phase_text(summary)


def phase_text(summary: Mapping[str, Any]) -> str:
    """One line: each phase's p50 in ms, throughput, and whether a CUDA graph ran."""
    names = {
        "h2d_ms": "H2D",
        "compute_ms": "GPU compute",
        "d2h_ms": "D2H",
        "latency_ms": "latency",
        "enqueue_ms": "enqueue",
    }
    phases = ", ".join(f"{label} p50 {summary[phase]['p50_ms']:.3f} ms" for phase, label in names.items())
    graph = summary["cuda_graph"]
    graph_text = "CUDA graph" if graph["used"] else f"no CUDA graph ({graph['reason']})"
    return f"{phases}; {summary['throughput_ips']:.1f} images/s; {graph_text}; {summary['verdict']}"


class CudartEngineOps:
    """A TensorRT engine's own execution context at one batch size, its buffers (device, and pinned
    host memory zero-filled), a non-blocking stream and four events, through cuda-python's runtime.

    With `cuda_graph`, one eager enqueue sets the context up, then one enqueue is captured (thread-local
    mode) and each iteration launches the graph; a capture that fails falls back to eager enqueues and
    says why in `cuda_graph_state`. Close it (a context manager) to free everything.
    """

    def __init__(
        self, engine: trt.ICudaEngine, batch_size: int, cudart: ModuleType, cuda_graph: bool
    ) -> None:
        with optional_import("the TensorRT breakdown"):
            import tensorrt as trt

        self._rt = cudart
        self._buffers: list[tuple[int, int]] = []  # (device, host) pointers to free
        self._inputs: list[tuple[int, int, int]] = []  # (device, host, bytes)
        self._outputs: list[tuple[int, int, int]] = []
        self._graph: Any = None
        self._events: list[Any] = []
        self._stream: Any = None
        self.cuda_graph_state: dict[str, Any] = {"used": False, "reason": "disabled"}
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context for the breakdown")
        self._context = context
        try:
            self._stream = self._check(
                cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
            )
            self._events = [self._check(cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(4)]
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            for name in names:
                if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    high = engine.get_tensor_profile_shape(name, 0)[2]
                    shape = (batch_size, *(int(high[i]) for i in range(1, len(high))))
                    if not context.set_input_shape(name, shape):
                        raise RuntimeError(f"TensorRT rejected input shape {shape} for {name!r}")
            for name in names:
                dims = context.get_tensor_shape(name)
                nbytes = (
                    math.prod(int(dims[i]) for i in range(len(dims))) * engine.get_tensor_dtype(name).itemsize
                )
                device, host = self._allocate(nbytes)
                if not context.set_tensor_address(name, device):
                    raise RuntimeError(f"TensorRT rejected the buffer for {name!r}")
                is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                (self._inputs if is_input else self._outputs).append((device, host, nbytes))
            if cuda_graph:
                self._capture()
        except BaseException:
            self.close()
            raise

    def _check(self, result: Any, what: str) -> Any:
        # cuda-python returns (error, *values) from every call instead of raising.
        err, *values = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"{what} failed: {err}")
        return values[0] if values else None

    def _allocate(self, nbytes: int) -> tuple[int, int]:
        device = int(self._check(self._rt.cudaMalloc(nbytes), "cudaMalloc"))
        host = int(
            self._check(self._rt.cudaHostAlloc(nbytes, self._rt.cudaHostAllocDefault), "cudaHostAlloc")
        )
        self._buffers.append((device, host))
        ctypes.memset(host, 0, nbytes)
        return device, host

    def _execute(self) -> None:
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execution failed")

    def _capture(self) -> None:
        rt = self._rt
        self._execute()  # TensorRT's guide: enqueue once before capturing, so the context is set up
        self._check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(rt.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        try:
            self._execute()
        except RuntimeError as exc:
            # Leave capture mode, or the stream stays unusable; then run eagerly.
            err, graph = rt.cudaStreamEndCapture(self._stream)
            if err == rt.cudaError_t.cudaSuccess and graph is not None:
                rt.cudaGraphDestroy(graph)
            self.cuda_graph_state = {"used": False, "reason": f"capture failed: {exc}"}
            return
        err, graph = rt.cudaStreamEndCapture(self._stream)
        if err != rt.cudaError_t.cudaSuccess:
            self.cuda_graph_state = {"used": False, "reason": f"capture failed: {err}"}
            return
        try:
            self._graph = self._check(
                rt.cudaGraphInstantiateWithFlags(graph, 0), "cudaGraphInstantiateWithFlags"
            )
            self.cuda_graph_state = {"used": True, "reason": None}
        except RuntimeError as exc:
            self.cuda_graph_state = {"used": False, "reason": str(exc)}
        finally:
            rt.cudaGraphDestroy(graph)

    def record(self, slot: int) -> None:
        self._check(self._rt.cudaEventRecord(self._events[slot], self._stream), "cudaEventRecord")

    def _copy(self, buffers: list[tuple[int, int, int]], to_device: bool) -> None:
        kind = self._rt.cudaMemcpyKind
        direction = kind.cudaMemcpyHostToDevice if to_device else kind.cudaMemcpyDeviceToHost
        for device, host, nbytes in buffers:
            source, target = (host, device) if to_device else (device, host)
            self._check(
                self._rt.cudaMemcpyAsync(target, source, nbytes, direction, self._stream), "cudaMemcpyAsync"
            )

    def copy_inputs(self) -> None:
        self._copy(self._inputs, to_device=True)

    def enqueue(self) -> None:
        if self._graph is not None:
            self._check(self._rt.cudaGraphLaunch(self._graph, self._stream), "cudaGraphLaunch")
        else:
            self._execute()

    def copy_outputs(self) -> None:
        self._copy(self._outputs, to_device=False)

    def wait(self) -> None:
        self._check(self._rt.cudaEventSynchronize(self._events[OUTPUT_END]), "cudaEventSynchronize")

    def elapsed_ms(self, start: int, end: int) -> float:
        return float(
            self._check(
                self._rt.cudaEventElapsedTime(self._events[start], self._events[end]), "cudaEventElapsedTime"
            )
        )

    def close(self) -> None:
        """Free the graph, events, stream and buffers (each at most once)."""
        rt = self._rt
        if self._stream is not None:
            rt.cudaStreamSynchronize(self._stream)
        if self._graph is not None:
            rt.cudaGraphExecDestroy(self._graph)
            self._graph = None
        for event in self._events:
            rt.cudaEventDestroy(event)
        self._events = []
        for device, host in self._buffers:
            rt.cudaFree(device)
            rt.cudaFreeHost(host)
        self._buffers = []
        if self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
            self._stream = None

    def __enter__(self) -> CudartEngineOps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def tensorrt_breakdown(
    engine: trt.ICudaEngine, batch_size: int, *, warmup: int, iters: int, cuda_graph: bool
) -> dict[str, Any]:
    """The breakdown of `engine` at `batch_size` (its own context and buffers, beside the runner's),
    or unknown with the reason when cuda-python is missing. At most MAX_BREAKDOWN_ITERS iterations."""
    cudart = import_cudart()
    if cudart is None:
        return unknown("the breakdown needs cuda-python's runtime bindings: pip install cuda-bindings")
    with CudartEngineOps(engine, batch_size, cudart, cuda_graph) as ops:
        return run_breakdown(
            ops,
            batch_size,
            warmup=warmup,
            iters=min(iters, MAX_BREAKDOWN_ITERS),
            cuda_graph=ops.cuda_graph_state,
        )
