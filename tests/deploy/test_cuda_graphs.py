"""CUDA graphs in the runners: the per-shape warm-up -> capture -> replay logic, and its fallback.

`CudaGraphCache` needs no GPU, so it is driven here with fakes whose "graphs" really hold a static
buffer that replay must refill. The TensorRT runner's graph path runs against a fake engine and fake
device memory that follow TensorRT's capture rules (enqueue once after a shape change, nothing
executes while capturing, a graph replays what its context holds). The real checks, graph output
against eager output on a GPU, are marked `gpu` and skip without CUDA.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.latency import enable_cuda_graphs
from deploy.errors import UsageError
from deploy.gpu import import_cudart
from deploy.runners.cuda_graphs import CudaGraphCache
from deploy.runners.tensorrt_runner import (
    TensorRTRunner,
    _CudaPythonMemory,
    _TorchMemory,
    decode_named_output,
    from_bfloat16_bits,
    to_bfloat16_bits,
)
from deploy.runners.torch_runner import TorchRunner
from tests.helpers import export_onnx, tensorrt_gpu_missing

# --------------------------------------------------------------------------- CudaGraphCache with fakes


@dataclass
class FakeGraph:
    """A "graph" computing 2 * x + 1 on its static input buffer, like a captured forward pass."""

    static_input: np.ndarray


class FakeBackend:
    """eager/capture/replay callables for one cache, logging which path every call took."""

    def __init__(self, *, fail_capture: bool = False, fail_replay_at: int | None = None) -> None:
        self.log: list[str] = []
        self.released: list[FakeGraph] = []
        self.fail_capture = fail_capture
        self.fail_replay_at = fail_replay_at  # the n-th replay (1-based) raises
        self.replays = 0

    def eager(self, x: np.ndarray) -> np.ndarray:
        self.log.append("eager")
        return 2 * x + 1

    def capture(self, shape: tuple[int, ...]) -> FakeGraph:
        self.log.append("capture")
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        return FakeGraph(np.zeros(shape, np.float32))

    def replay(self, graph: FakeGraph, x: np.ndarray) -> np.ndarray:
        self.log.append("replay")
        self.replays += 1
        if self.replays == self.fail_replay_at:
            raise RuntimeError("cudaGraphLaunch failed")
        graph.static_input[...] = x
        return 2 * graph.static_input + 1

    def call(self, cache: CudaGraphCache[FakeGraph], x: np.ndarray) -> np.ndarray:
        return cache.run(
            x.shape,
            eager=lambda: self.eager(x),
            capture=lambda: self.capture(x.shape),
            replay=lambda graph: self.replay(graph, x),
        )


def _batches(shape: tuple[int, ...], count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def test_first_call_warms_up_second_captures_later_calls_replay() -> None:
    backend = FakeBackend()
    cache: CudaGraphCache[FakeGraph] = CudaGraphCache(backend.released.append)
    shape = (2, 3)
    assert cache.state(shape) is None
    states = []
    for x in _batches(shape, 4):
        # Every call's own input must come out, so a replay that skipped the copy-in would fail.
        np.testing.assert_array_equal(backend.call(cache, x), 2 * x + 1)
        states.append(cache.state(shape))
    assert backend.log == ["eager", "capture", "replay", "replay", "replay"]
    assert states == [cache.WARM, cache.CAPTURED, cache.CAPTURED, cache.CAPTURED]
    assert cache.captured == [shape] and cache.error is None and backend.released == []


def test_each_batch_shape_has_its_own_warm_up_and_graph() -> None:
    backend = FakeBackend()
    cache: CudaGraphCache[FakeGraph] = CudaGraphCache(backend.released.append)
    small, large = _batches((1, 3), 3), _batches((4, 3), 2, seed=1)
    for x in (small[0], small[1], large[0], small[2], large[1]):
        np.testing.assert_array_equal(backend.call(cache, x), 2 * x + 1)
    assert backend.log == ["eager", "capture", "replay", "eager", "replay", "capture", "replay"]
    assert cache.captured == [(1, 3), (4, 3)]


def test_failed_capture_falls_back_and_says_why() -> None:
    backend = FakeBackend(fail_capture=True)
    cache: CudaGraphCache[FakeGraph] = CudaGraphCache(backend.released.append)
    for x in _batches((2, 3), 4):
        np.testing.assert_array_equal(backend.call(cache, x), 2 * x + 1)
    # One capture attempt, then eager for good: a failing capture is not retried on every call.
    assert backend.log == ["eager", "capture", "eager", "eager", "eager"]
    assert cache.state((2, 3)) == cache.FAILED and cache.captured == []
    assert cache.error == (
        "batch shape (2, 3): RuntimeError: operation not permitted when stream is capturing"
    )

    backend.fail_capture = False  # another shape still gets its graph
    for x in _batches((5, 3), 2):
        backend.call(cache, x)
    assert (
        cache.captured == [(5, 3)]
        and cache.error is not None
        and cache.error.startswith("batch shape (2, 3)")
    )


def test_graph_whose_first_replay_fails_is_released_and_not_used() -> None:
    backend = FakeBackend(fail_replay_at=1)
    cache: CudaGraphCache[FakeGraph] = CudaGraphCache(backend.released.append)
    for x in _batches((2, 3), 3):
        np.testing.assert_array_equal(backend.call(cache, x), 2 * x + 1)
    assert backend.log == ["eager", "capture", "replay", "eager", "eager"]
    assert len(backend.released) == 1 and cache.captured == []
    assert cache.error == "batch shape (2, 3): RuntimeError: cudaGraphLaunch failed"


def test_a_later_replay_failure_is_a_real_error() -> None:
    backend = FakeBackend(fail_replay_at=2)
    cache: CudaGraphCache[FakeGraph] = CudaGraphCache(backend.released.append)
    x = _batches((2, 3), 1)[0]
    backend.call(cache, x)
    backend.call(cache, x)
    with pytest.raises(RuntimeError, match="cudaGraphLaunch failed"):
        backend.call(cache, x)


def test_failed_warm_up_does_not_count() -> None:
    cache: CudaGraphCache[FakeGraph] = CudaGraphCache(lambda graph: None)

    def broken() -> np.ndarray:
        raise ValueError("bad batch")

    def no_capture() -> FakeGraph:
        raise AssertionError("captured after a warm-up that failed")

    with pytest.raises(ValueError, match="bad batch"):
        cache.run((1,), eager=broken, capture=no_capture, replay=lambda graph: np.zeros(1))
    assert cache.state((1,)) is None


def test_clear_releases_every_graph_once_and_starts_over() -> None:
    backend = FakeBackend()
    cache: CudaGraphCache[FakeGraph] = CudaGraphCache(backend.released.append)
    for shape in ((1, 3), (4, 3)):
        for x in _batches(shape, 2):
            backend.call(cache, x)
    cache.clear()
    assert [g.static_input.shape for g in backend.released] == [(1, 3), (4, 3)]
    cache.clear()
    assert len(backend.released) == 2
    backend.log.clear()
    backend.call(cache, _batches((1, 3), 1)[0])
    assert backend.log == ["eager"] and cache.captured == []


# --------------------------------------------------------------------------- the torch runner on the CPU


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip


def test_cpu_torch_runner_refuses_cuda_graphs_and_the_bench_says_why() -> None:
    with TorchRunner(tiny_net(), (3, 8, 8)) as runner:
        assert runner.supports_cuda_graphs is False and runner.use_cuda_graphs is False
        with pytest.raises(UsageError, match=r"torch/fp32: CUDA graphs need device 'cuda'"):
            runner.use_cuda_graphs = True
        assert enable_cuda_graphs(runner, wanted=True) == (False, "CPU runner")
        assert runner.use_cuda_graphs is False
        runner.use_cuda_graphs = False  # turning them off is always allowed
        x = np.zeros((2, 3, 8, 8), np.float32)
        assert runner.infer(x).shape == (2, 10) and runner.cuda_graph_shapes == []
        assert runner.cuda_graph_error is None


# --------------------------------------------------------------------------- the TensorRT runner with fakes

INPUT, OUTPUT = "images", "logits"
CHW = (3, 4, 4)
MAX_BATCH = 8
CLASSES_OUT = 10
WEIGHTS = np.random.default_rng(7).standard_normal((CHW[0], CLASSES_OUT)).astype(np.float32)


def reference_logits(x: np.ndarray) -> np.ndarray:
    """What the fake engine computes: channel means times a fixed matrix."""
    return x.astype(np.float32).mean(axis=(2, 3)) @ WEIGHTS


class FakeDataType(enum.Enum):
    """tensorrt.DataType members an engine's I/O can have."""

    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    FP8 = 6


# tensorrt.nptype's mapping; like it, an unmapped type (BF16, FP8) raises TypeError.
NPTYPES: dict[FakeDataType, type] = {
    FakeDataType.FLOAT: np.float32,
    FakeDataType.HALF: np.float16,
    FakeDataType.INT8: np.int8,
    FakeDataType.INT32: np.int32,
    FakeDataType.BOOL: np.bool_,
}
# How the fake kernel holds each type in device memory: BF16 as its raw 16 bits, as TensorRT does.
DEVICE_TYPES: dict[FakeDataType, type] = {**NPTYPES, FakeDataType.BF16: np.uint16}


def fake_nptype(dtype: FakeDataType) -> type:
    if dtype not in NPTYPES:
        raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype: {dtype}")
    return NPTYPES[dtype]


class FakeDims:
    """tensorrt.Dims: sized and indexable, but not a tuple (it never compares equal to one)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._dims = list(shape)

    def __len__(self) -> int:
        return len(self._dims)

    def __getitem__(self, index: int) -> int:
        return self._dims[index]

    def __repr__(self) -> str:
        return f"Dims({self._dims})"


def host_array(address: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """The array at a host address, as an engine reading a buffer by its pointer sees it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_char * nbytes).from_address(address)
    return np.frombuffer(memoryview(raw).cast("B"), dtype=dtype).reshape(shape)


class Launcher(Protocol):
    def enqueue(self, stream_handle: int, work: Callable[[], None]) -> None: ...


class RunAtOnce:
    """A stream with nothing to capture: work runs when it is queued (torch buffers on the CPU)."""

    def enqueue(self, stream_handle: int, work: Callable[[], None]) -> None:
        assert stream_handle == 0
        work()


@dataclass
class FakeMemory:
    """Device memory whose stream either executes work or, while capturing, records it."""

    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    recording: list[Callable[[], None]] | None = None
    log: list[str] = field(default_factory=list)
    fail_capture: bool = False

    stream_handle = 1234

    def allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
        assert isinstance(shape, tuple) and all(isinstance(d, int) for d in shape), shape
        self.buffers[name] = np.zeros(shape, dtype)
        return int(self.buffers[name].ctypes.data)

    def enqueue(self, stream_handle: int, work: Callable[[], None]) -> None:
        assert stream_handle == self.stream_handle
        if self.recording is not None:
            self.recording.append(work)
        else:
            work()

    def upload(self, name: str, array: np.ndarray) -> None:
        assert self.recording is None, "a copy inside the capture would bake this call's input in"
        assert array.dtype == self.buffers[name].dtype
        self.buffers[name].reshape(-1)[: array.size] = array.reshape(-1)

    def download(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        assert self.recording is None
        count = int(np.prod(shape))
        return self.buffers[name].reshape(-1)[:count].reshape(shape).copy()

    def synchronize(self) -> None:
        assert self.recording is None, "synchronising a capturing stream invalidates the capture"

    def capture_graph(self, enqueue: Callable[[], None]) -> list[Callable[[], None]]:
        self.log.append("capture")
        self.recording = []
        try:
            enqueue()
            if self.fail_capture:
                raise RuntimeError("cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated")
            return self.recording
        finally:
            self.recording = None

    def launch_graph(self, graph: list[Callable[[], None]]) -> None:
        self.log.append("launch")
        for work in graph:
            work()

    def free_graph(self, graph: list[Callable[[], None]]) -> None:
        self.log.append("free_graph")

    def close(self) -> None:
        self.log.append("close")


class FakeContext:
    """An execution context: its work reads its *current* shape when it runs, as TensorRT's host state
    does, so a graph replayed after its context changed shape would compute the wrong batch. The work
    reads and writes the buffers through the addresses it was given, as TensorRT's kernels do."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shape: tuple[int, ...] = ()
        self.addresses: dict[str, int] = {}
        self.ready = False  # enqueued since the last shape change

    def set_input_shape(self, name: str, shape: Any) -> bool:
        assert name == INPUT
        dims = tuple(int(shape[i]) for i in range(len(shape)))
        if dims != self.shape:
            self.shape, self.ready = dims, False
        return 1 <= dims[0] <= MAX_BATCH

    def set_tensor_address(self, name: str, address: int) -> bool:
        assert isinstance(address, int) and address != 0
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name: str) -> FakeDims:
        return FakeDims(self.shape if name == INPUT else (self.shape[0], CLASSES_OUT))

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine = self.engine
        if getattr(engine.launcher, "recording", None) is not None and not self.ready:
            return False  # capturing the first enqueue after a shape change fails in TensorRT
        if getattr(engine.launcher, "capturing", None) is not None and not self.ready:
            return False
        assert set(self.addresses) == {INPUT, OUTPUT}
        addresses, batch = dict(self.addresses), self.shape[0]

        def work() -> None:
            # A real kernel takes time: without the runner's lock, another thread's upload or kernel
            # could write these buffers meanwhile.
            engine.pause()
            types = engine.io_dtypes
            x = host_array(addresses[INPUT], (MAX_BATCH, *CHW), DEVICE_TYPES[types[INPUT]])[:batch]
            out = host_array(addresses[OUTPUT], (MAX_BATCH, CLASSES_OUT), DEVICE_TYPES[types[OUTPUT]])
            if types[INPUT] == FakeDataType.BF16:
                x = from_bfloat16_bits(x)
            logits = reference_logits(x)
            out[:batch] = to_bfloat16_bits(logits) if types[OUTPUT] == FakeDataType.BF16 else logits
            engine.pause()

        engine.launcher.enqueue(stream_handle, work)
        self.ready = True
        return True


class FakeEngine:
    def __init__(
        self,
        launcher: Launcher,
        input_dtype: FakeDataType = FakeDataType.FLOAT,
        output_dtype: FakeDataType = FakeDataType.FLOAT,
        kernel_seconds: float = 0.0,
    ) -> None:
        self.launcher = launcher
        self.io_dtypes = {INPUT: input_dtype, OUTPUT: output_dtype}
        self.kernel_seconds = kernel_seconds
        self.contexts: list[FakeContext] = []
        self.num_io_tensors = 2

    def pause(self) -> None:
        if self.kernel_seconds:
            time.sleep(self.kernel_seconds)

    def get_tensor_name(self, index: int) -> str:
        return (INPUT, OUTPUT)[index]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == INPUT else "output"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[FakeDims]:
        assert profile == 0
        return [FakeDims((1, *CHW)), FakeDims((4, *CHW)), FakeDims((MAX_BATCH, *CHW))]

    def get_tensor_dtype(self, name: str) -> FakeDataType:
        return self.io_dtypes[name]

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt_runner(
    monkeypatch: pytest.MonkeyPatch,
    memory: Any,
    launcher: Launcher | None = None,
    **engine_options: Any,
) -> tuple[TensorRTRunner, FakeEngine]:
    """A TensorRTRunner set up by its own `_setup` over a fake engine, `memory` and `tensorrt` module.

    `launcher` runs the engine's work: the memory itself (FakeMemory, FakeCudart) by default. The
    constructor's file, sidecar and TensorRT/GPU checks are skipped: they need the real thing and
    are tested in tests/export/test_tensorrt_engine.py.
    """
    fake_trt = types.ModuleType("tensorrt")
    fake_trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")  # type: ignore[attr-defined]
    fake_trt.nptype = fake_nptype  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setattr("deploy.runners.tensorrt_runner._device_memory", lambda device_index: memory)
    engine = FakeEngine(launcher if launcher is not None else memory, **engine_options)
    runner = TensorRTRunner.__new__(TensorRTRunner)
    runner._init_state()  # what the constructor sets before it loads TensorRT
    runner.device_index = 0
    runner.plan_path = Path("fake.plan")
    runner.sidecar = types.SimpleNamespace(input_names=(INPUT,), output_names=(OUTPUT,))  # type: ignore[assignment]
    runner.precision = "fp32"
    runner._engine = engine  # type: ignore[assignment]
    runner._setup(engine)  # type: ignore[arg-type]
    return runner, engine


def test_tensorrt_runner_graphs_match_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = FakeMemory()
    runner, engine = fake_tensorrt_runner(monkeypatch, memory)
    assert TensorRTRunner.supports_cuda_graphs is True and runner.use_cuda_graphs is False
    assert enable_cuda_graphs(runner, wanted=True) == (True, None) and runner.use_cuda_graphs is True
    rng = np.random.default_rng(0)
    # Interleaved batch sizes: each replay must run at its own shape whatever ran before it.
    for batch in (2, 2, 5, 2, 5, 5, 2, 1):
        x = rng.standard_normal((batch, *CHW)).astype(np.float32)
        np.testing.assert_allclose(runner.infer(x), reference_logits(x), rtol=1e-6)
    assert runner.cuda_graph_shapes == [(2, *CHW), (5, *CHW)] and runner.cuda_graph_error is None
    # The main context plus one dedicated context per graph, bound to the same buffers.
    assert len(engine.contexts) == 3
    assert all(c.addresses == engine.contexts[0].addresses for c in engine.contexts)
    assert [c.shape[0] for c in engine.contexts[1:]] == [2, 5]
    assert memory.log == ["capture", "launch", "launch", "capture", "launch", "launch", "launch"]

    runner.close()
    assert memory.log[-3:] == ["free_graph", "free_graph", "close"]  # graphs before their memory
    runner.close()
    assert memory.log.count("close") == 1


def test_tensorrt_runner_falls_back_when_capture_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = FakeMemory(fail_capture=True)
    runner, _ = fake_tensorrt_runner(monkeypatch, memory)
    runner.use_cuda_graphs = True
    rng = np.random.default_rng(1)
    for _ in range(4):
        x = rng.standard_normal((3, *CHW)).astype(np.float32)
        np.testing.assert_allclose(runner.infer(x), reference_logits(x), rtol=1e-6)
    assert memory.log == ["capture"] and runner.cuda_graph_shapes == []
    assert runner.cuda_graph_error == (
        "batch shape (3, 3, 4, 4): RuntimeError: "
        "cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated"
    )
    runner.close()


def test_tensorrt_runner_buffers_take_each_tensors_own_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    # An engine with fp16 I/O: the input is cast to fp16 on the way in, the logits come back float32.
    memory = FakeMemory()
    runner, _ = fake_tensorrt_runner(
        monkeypatch, memory, input_dtype=FakeDataType.HALF, output_dtype=FakeDataType.HALF
    )
    assert memory.buffers[INPUT].dtype == np.float16 and memory.buffers[INPUT].shape == (MAX_BATCH, *CHW)
    assert memory.buffers[OUTPUT].dtype == np.float16 and memory.buffers[OUTPUT].shape == (MAX_BATCH, 10)
    assert (runner.min_batch, runner.max_batch, runner.input_shape) == (1, MAX_BATCH, CHW)
    x = np.random.default_rng(2).standard_normal((3, *CHW)).astype(np.float32)
    logits = runner.infer(x)
    assert logits.dtype == np.float32 and logits.shape == (3, 10)
    expected = reference_logits(x.astype(np.float16)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(logits, expected)
    runner.close()


def test_a_plan_with_bf16_io_runs_through_its_raw_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """trt.nptype raises for BF16 (numpy has no bfloat16); a plan built elsewhere with BF16 I/O ran
    into that at load. Its buffers hold the raw 16 bits, converted on the way in and out."""
    memory = FakeMemory()
    runner, _ = fake_tensorrt_runner(
        monkeypatch, memory, input_dtype=FakeDataType.BF16, output_dtype=FakeDataType.BF16
    )
    assert memory.buffers[INPUT].dtype == np.uint16 and memory.buffers[OUTPUT].dtype == np.uint16
    x = np.random.default_rng(3).standard_normal((2, *CHW)).astype(np.float32)
    logits = runner.infer(x)
    expected = from_bfloat16_bits(to_bfloat16_bits(reference_logits(from_bfloat16_bits(to_bfloat16_bits(x)))))
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, expected)
    runner.close()


def test_an_io_type_the_runner_cannot_convert_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match=r"the plan's tensor 'logits' is FP8, which this runner cannot"):
        fake_tensorrt_runner(monkeypatch, FakeMemory(), output_dtype=FakeDataType.FP8)


def test_bfloat16_conversion_rounds_to_nearest_even() -> None:
    values = np.array([1.0, -2.5, 1 + 2**-7, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, np.inf, 3.0e38], np.float32)
    back = from_bfloat16_bits(to_bfloat16_bits(values))
    # bfloat16 keeps 7 fraction bits: 1 + 2^-7 is one; 1 + 2^-8 is a tie, to even (1.0); 1 + 3*2^-8 is a
    # tie, to even (1 + 2^-6); 1 + 2^-9 rounds down.
    np.testing.assert_array_equal(back[:6], [1.0, -2.5, 1 + 2**-7, 1.0, 1 + 2**-6, 1.0])
    assert np.isposinf(back[6]) and np.isfinite(back[7])
    assert np.isnan(from_bfloat16_bits(to_bfloat16_bits(np.array([np.nan], np.float32))))[0]


@pytest.mark.parametrize("graphs", [False, True])
def test_concurrent_calls_each_get_their_own_logits(monkeypatch: pytest.MonkeyPatch, graphs: bool) -> None:
    # The fake kernel sleeps before it reads the input buffer and after it writes the output buffer:
    # without the runner's lock, other threads' uploads and kernels land in between and a caller gets
    # another's logits.
    memory = FakeMemory()
    runner, _ = fake_tensorrt_runner(monkeypatch, memory, kernel_seconds=0.002)
    runner.use_cuda_graphs = graphs
    inputs = [np.full((2, *CHW), float(i), np.float32) for i in range(8)]
    wrong: list[int] = []

    def worker(i: int) -> None:
        for _ in range(5):
            if not np.allclose(runner.infer(inputs[i]), reference_logits(inputs[i])):
                wrong.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    runner.close()


# --------------------------------------------------------------------------- the memory classes on the CPU


@pytest.mark.parametrize("dtype", [FakeDataType.FLOAT, FakeDataType.HALF])
def test_torch_memory_runs_the_runner_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, dtype: FakeDataType
) -> None:
    memory = _TorchMemory(torch.device("cpu"))
    assert memory.stream_handle == 0
    runner, _ = fake_tensorrt_runner(monkeypatch, memory, RunAtOnce(), input_dtype=dtype, output_dtype=dtype)
    rng = np.random.default_rng(3)
    first = None
    for batch in (MAX_BATCH, 3, 1):  # smaller batches use the leading part of the max-size buffers
        x = rng.standard_normal((batch, *CHW)).astype(np.float32)
        logits = runner.infer(x)
        cast = np.dtype(NPTYPES[dtype])
        expected = reference_logits(x.astype(cast)).astype(cast).astype(np.float32)
        np.testing.assert_array_equal(logits, expected)
        first = logits if first is None else first
    # Results are copies: the staging buffer the next call rewrites does not change them.
    assert first is not None and first.shape == (MAX_BATCH, 10) and np.isfinite(first).all()
    runner.close()


class FakeCudart:
    """cuda-python's runtime bindings over host memory: every call returns (error, *values), device
    memory is host memory that only cudaMemcpyAsync may touch, and work queued on a capturing stream
    is recorded. It checks what the issue asks of the runner: a non-blocking stream and copies from
    pinned host memory only."""

    cudaStreamNonBlocking = 1
    cudaHostAllocDefault = 0

    class cudaError_t(enum.Enum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorStreamCaptureInvalidated = 901

    class cudaMemcpyKind(enum.Enum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode(enum.Enum):
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self, fail_malloc: bool = False) -> None:
        self._blocks: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.device: set[int] = set()
        self.pinned: set[int] = set()
        self.streams: dict[int, int] = {}  # handle -> flags
        self.capturing: list[Callable[[], None]] | None = None
        self.log: list[str] = []
        self.fail_malloc = fail_malloc
        self.copies = 0
        self.current_device: int | None = None

    def cudaSetDevice(self, device: int) -> tuple[Any, ...]:
        self.current_device = device
        return self._ok()

    def _ok(self, *values: Any) -> tuple[Any, ...]:
        return (self.cudaError_t.cudaSuccess, *values)

    def _block(self, size: int) -> int:
        block = ctypes.create_string_buffer(size)
        self._blocks[ctypes.addressof(block)] = block
        return ctypes.addressof(block)

    def _inside(self, pointer: int, pool: set[int]) -> bool:
        return any(base <= pointer < base + len(self._blocks[base]) for base in pool)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[Any, ...]:
        handle = 0x5000 + len(self.streams)
        self.streams[handle] = flags
        return self._ok(handle)

    def cudaStreamDestroy(self, stream: int) -> tuple[Any, ...]:
        self.log.append("cudaStreamDestroy")
        del self.streams[stream]
        return self._ok()

    def cudaMalloc(self, size: int) -> tuple[Any, ...]:
        if self.fail_malloc:
            return (self.cudaError_t.cudaErrorMemoryAllocation, None)
        pointer = self._block(size)
        self.device.add(pointer)
        return self._ok(pointer)

    def cudaHostAlloc(self, size: int, flags: int) -> tuple[Any, ...]:
        pointer = self._block(size)
        self.pinned.add(pointer)
        return self._ok(pointer)

    def cudaFree(self, pointer: int) -> tuple[Any, ...]:
        self.device.remove(pointer)
        return self._ok()

    def cudaFreeHost(self, pointer: int) -> tuple[Any, ...]:
        self.pinned.remove(pointer)
        return self._ok()

    def enqueue(self, stream: int, work: Callable[[], None]) -> None:
        assert stream in self.streams
        if self.capturing is not None:
            self.capturing.append(work)
        else:
            work()

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: Any, stream: int) -> tuple[Any, ...]:
        host, device = (src, dst) if kind is self.cudaMemcpyKind.cudaMemcpyHostToDevice else (dst, src)
        assert self._inside(host, self.pinned), "an async copy from pageable memory is synchronous"
        assert self._inside(device, self.device)
        assert self.capturing is None, "the runner never captures its copies"
        self.copies += 1
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, count))
        return self._ok()

    def cudaStreamSynchronize(self, stream: int) -> tuple[Any, ...]:
        assert self.capturing is None
        return self._ok()

    def cudaStreamBeginCapture(self, stream: int, mode: Any) -> tuple[Any, ...]:
        assert mode is self.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.capturing = []
        return self._ok()

    def cudaStreamEndCapture(self, stream: int) -> tuple[Any, ...]:
        graph, self.capturing = self.capturing, None
        return self._ok(graph)

    def cudaGraphInstantiateWithFlags(self, graph: list[Callable[[], None]], flags: int) -> tuple[Any, ...]:
        self.log.append("instantiate")
        return self._ok(list(graph))

    def cudaGraphDestroy(self, graph: Any) -> tuple[Any, ...]:
        return self._ok()

    def cudaGraphLaunch(self, graph: list[Callable[[], None]], stream: int) -> tuple[Any, ...]:
        self.log.append("launch")
        for work in graph:
            self.enqueue(stream, work)
        return self._ok()

    def cudaGraphExecDestroy(self, graph: Any) -> tuple[Any, ...]:
        self.log.append("cudaGraphExecDestroy")
        return self._ok()


def test_cuda_python_memory_uses_a_non_blocking_stream_and_pinned_staging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cudart = FakeCudart()
    memory = _CudaPythonMemory(cudart, device_index=1)  # type: ignore[arg-type]
    assert list(cudart.streams.values()) == [cudart.cudaStreamNonBlocking]
    assert cudart.current_device == 1  # the stream and the buffers belong to the device asked for
    runner, _ = fake_tensorrt_runner(monkeypatch, memory, cudart)
    # One device buffer and one pinned staging buffer per tensor, both of the max batch.
    assert len(cudart.device) == len(cudart.pinned) == 2
    runner.use_cuda_graphs = True
    rng = np.random.default_rng(4)
    for batch in (2, 2, 2, 7, 7, 2):
        x = rng.standard_normal((batch, *CHW)).astype(np.float32)
        np.testing.assert_allclose(runner.infer(x), reference_logits(x), rtol=1e-6)
    assert runner.cuda_graph_shapes == [(2, *CHW), (7, *CHW)] and runner.cuda_graph_error is None
    assert cudart.log.count("instantiate") == 2 and cudart.log.count("launch") == 4
    assert cudart.copies == 12  # one copy in and one out per call, none inside a graph
    runner.close()
    assert cudart.device == set() and cudart.pinned == set() and cudart.streams == {}
    assert cudart.log[-3:] == ["cudaGraphExecDestroy", "cudaGraphExecDestroy", "cudaStreamDestroy"]


def test_cuda_python_errors_name_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = _CudaPythonMemory(FakeCudart(fail_malloc=True))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"cudaMalloc failed: cudaError_t\.cudaErrorMemoryAllocation"):
        fake_tensorrt_runner(monkeypatch, memory, RunAtOnce())


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for torch")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_runner_graph_replay_matches_eager(precision: str) -> None:
    model = tiny_net()
    rng = np.random.default_rng(0)
    with (
        TorchRunner(model, (3, 16, 16), device="cuda", precision=precision) as graphed,
        TorchRunner(model, (3, 16, 16), device="cuda", precision=precision) as eager,
    ):
        assert enable_cuda_graphs(graphed, wanted=True) == (True, None)
        for batch in (1, 4, 1, 4, 1, 4):
            x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
            # Same kernels on the same inputs: the graph's logits are the eager ones.
            np.testing.assert_allclose(graphed.infer(x), eager.infer(x), rtol=1e-5, atol=1e-5)
        assert graphed.cuda_graph_error is None
        assert graphed.cuda_graph_shapes == [(1, 3, 16, 16), (4, 3, 16, 16)]
    assert graphed.cuda_graph_shapes == []  # close() released them


def _cuda_python_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None if import_cudart() is not None else "needs cuda-python"


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_python_reason() is not None, reason=str(_cuda_python_reason()))
@pytest.mark.parametrize("kind", ["torch", "cuda-python"])
def test_memory_classes_on_a_gpu_use_a_non_blocking_stream_and_pinned_staging(kind: str) -> None:
    cudart = import_cudart()
    assert cudart is not None
    memory = _TorchMemory() if kind == "torch" else _CudaPythonMemory(cudart)
    memory.allocate(INPUT, (MAX_BATCH, *CHW), np.dtype(np.float32))
    err, flags = cudart.cudaStreamGetFlags(memory.stream_handle)
    assert err == cudart.cudaError_t.cudaSuccess and int(flags) & cudart.cudaStreamNonBlocking
    if isinstance(memory, _TorchMemory):
        assert memory._staging[INPUT].is_pinned()
    else:
        err, attributes = cudart.cudaPointerGetAttributes(memory._buffers[INPUT][1])
        assert err == cudart.cudaError_t.cudaSuccess
        assert attributes.type == cudart.cudaMemoryType.cudaMemoryTypeHost  # page-locked, not pageable
    x = np.random.default_rng(0).standard_normal((3, *CHW)).astype(np.float32)
    memory.upload(INPUT, x)
    np.testing.assert_array_equal(memory.download(INPUT, x.shape), x)
    memory.close()


TRT_GPU_MISSING = tensorrt_gpu_missing()


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(TRT_GPU_MISSING is not None, reason=f"needs TensorRT and a GPU: {TRT_GPU_MISSING}")
def test_tensorrt_runner_graph_replay_matches_eager(tmp_path: Path) -> None:
    from export.tensorrt_engine import build_engine

    onnx_file = export_onnx(tiny_net(), tmp_path / "student.onnx", (3, 16, 12))
    plan = tmp_path / "student.fp32.plan"
    build_engine(onnx_file, plan, min_batch=1, opt_batch=4, max_batch=8)
    rng = np.random.default_rng(0)
    with TensorRTRunner(plan) as graphed, TensorRTRunner(plan) as eager:
        assert enable_cuda_graphs(graphed, wanted=True) == (True, None)
        for batch in (2, 8, 2, 8, 2, 8):
            x = rng.standard_normal((batch, 3, 16, 12)).astype(np.float32)
            np.testing.assert_allclose(graphed.infer(x), eager.infer(x), rtol=1e-5, atol=1e-5)
        assert graphed.cuda_graph_error is None
        assert graphed.cuda_graph_shapes == [(2, 3, 16, 12), (8, 3, 16, 12)]


@pytest.mark.parametrize("output_dtype", [FakeDataType.FLOAT, FakeDataType.BF16])
def test_named_outputs_are_the_eager_outputs_by_name(
    monkeypatch: pytest.MonkeyPatch, output_dtype: FakeDataType
) -> None:
    runner, _ = fake_tensorrt_runner(monkeypatch, FakeMemory(), output_dtype=output_dtype)
    runner.use_cuda_graphs = True  # named outputs run eagerly whatever infer does
    x = np.random.default_rng(4).standard_normal((3, *CHW)).astype(np.float32)
    outputs = runner.infer_outputs(x)
    assert list(outputs) == [OUTPUT] and outputs[OUTPUT].dtype == np.float32
    np.testing.assert_array_equal(outputs[OUTPUT], runner.infer(x))
    runner.close()
    with pytest.raises(UsageError, match="closed"):
        runner.infer_outputs(x)


def test_named_integer_outputs_keep_their_type() -> None:
    counts = np.array([[3], [0]], dtype=np.int32)
    assert decode_named_output(counts, "INT32") is counts
    half = np.array([1.5, -2.0], dtype=np.float16)
    assert decode_named_output(half, "HALF").dtype == np.float32
