"""TensorRT runner: a plain `.plan` and its sidecar, run with the v3 execution API on a CUDA stream.

Before anything is deserialised the sidecar is checked against the installed TensorRT and the GPU
here, because an engine built elsewhere either fails to load with an opaque error or, worse, loads
and misbehaves. Device memory and the stream come from torch.cuda when torch is importable and
from cuda-python otherwise, so a serving device needs neither torch nor training code.

`infer` is thread-safe: calls from several threads run one at a time (they share the device
buffers and optimisation profile 0). For parallel inference open one runner per thread.

CUDA graphs (`use_cuda_graphs = True`, which the benchmark sets): per batch shape, the first call
runs normally, the second captures `execute_async_v3` into a graph, and later calls only copy the
input in, launch the graph and copy the logits out. `CudaGraphCache` holds that per-shape logic
without touching CUDA, so the torch runner shares it and the tests drive it with fakes.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from deploy.errors import MissingDependencyError, UsageError
from deploy.gpu import import_cudart
from deploy.optional import optional_import
from deploy.runners.base import Runner
from deploy.runners.cuda_graphs import CudaGraphCache, CudaGraphReporting
from deploy.trt_sidecar import (
    REBUILD_HINT,
    Sidecar,
    check_engine_compatible,
    read_sidecar,
    register_tensorrt_plugins,
    require_tensorrt_and_gpu,
    sidecar_path,
    start_tensorrt,
)

if TYPE_CHECKING:
    import tensorrt as trt
    import torch


class _DeviceMemory(Protocol):
    """Named device buffers and one CUDA stream; every copy is ordered on that stream."""

    @property
    def stream_handle(self) -> int: ...

    def allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int: ...

    def upload(self, name: str, array: np.ndarray) -> None: ...

    def download(self, name: str, shape: tuple[int, ...]) -> np.ndarray: ...

    def synchronize(self) -> None: ...

    def capture_graph(self, enqueue: Callable[[], None]) -> Any: ...

    def launch_graph(self, graph: Any) -> None: ...

    def free_graph(self, graph: Any) -> None: ...

    def close(self) -> None: ...


class _TorchMemory:
    """Buffers as tensors on `device` (the current CUDA device by default), copied in and out through
    pinned host staging tensors on a torch.cuda.Stream.

    torch's streams are created non-blocking: they never synchronise with the legacy default stream,
    whose work would otherwise invalidate a graph capture. A copy from pageable host memory is
    synchronous; from pinned memory it is truly asynchronous. Each staging tensor is reused across
    calls, which is safe because every call ends with `download`, whose synchronisation finishes the
    copies that read the staging tensor before the next call rewrites it.

    On a CPU device (tests) there is no stream, no pinning and nothing to synchronise; the buffer,
    dtype and partial-batch logic is the same.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        with optional_import("TensorRT buffers held by torch"):
            import torch

        self._torch = torch
        self._device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        cuda = self._device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self._device) if cuda else None
        self._pin = cuda
        self._buffers: dict[str, torch.Tensor] = {}
        self._staging: dict[str, torch.Tensor] = {}

    @property
    def stream_handle(self) -> int:
        return int(self._stream.cuda_stream) if self._stream is not None else 0

    def allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
        torch_dtype = self._torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        tensor = self._torch.empty(shape, dtype=torch_dtype, device=self._device)
        self._buffers[name] = tensor
        self._staging[name] = self._torch.empty(shape, dtype=torch_dtype, pin_memory=self._pin)
        return int(tensor.data_ptr())

    def upload(self, name: str, array: np.ndarray) -> None:
        staged = self._staging[name].view(-1)[: array.size]
        staged.copy_(self._torch.from_numpy(array).view(-1))
        with self._torch.cuda.stream(self._stream):
            self._buffers[name].view(-1)[: array.size].copy_(staged, non_blocking=True)

    def download(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        staged = self._staging[name].view(-1)[:count]
        with self._torch.cuda.stream(self._stream):
            staged.copy_(self._buffers[name].view(-1)[:count], non_blocking=True)
        self.synchronize()
        # A copy: the staging tensor is rewritten by the next call.
        return staged.numpy().reshape(shape).copy()

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def capture_graph(self, enqueue: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Record what `enqueue` queues on this runner's stream (never the default stream) as a graph."""
        graph = self._torch.cuda.CUDAGraph()
        # "thread_local": other threads' CUDA calls (allocator, profilers) do not invalidate the capture.
        with self._torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            enqueue()
        return graph

    def launch_graph(self, graph: torch.cuda.CUDAGraph) -> None:
        # replay() launches on the current stream; the copies around it are queued on ours.
        with self._torch.cuda.stream(self._stream):
            graph.replay()

    def free_graph(self, graph: torch.cuda.CUDAGraph) -> None:
        self.synchronize()
        graph.reset()

    def close(self) -> None:
        self.synchronize()
        self._buffers.clear()
        self._staging.clear()


def _host_view(pointer: int, nbytes: int, dtype: np.dtype[Any]) -> np.ndarray:
    """A flat numpy array over `nbytes` of host memory at `pointer` (no copy)."""
    return np.frombuffer(memoryview((ctypes.c_char * nbytes).from_address(pointer)).cast("B"), dtype=dtype)


class _CudaPythonMemory:
    """Buffers from cudaMalloc, pinned staging buffers from cudaHostAlloc and a non-blocking stream,
    through cuda-python's runtime bindings.

    The stream is non-blocking, as trtexec's: a blocking stream synchronises with the legacy default
    stream, and work there during a capture invalidates the graph. Copies go through pinned host
    buffers, one per tensor: from pageable memory cudaMemcpyAsync is synchronous. Each staging buffer
    is reused across calls, safe because every call ends with `download`, whose synchronisation
    finishes the copies that read it before the next call rewrites it.
    """

    def __init__(self, cudart: ModuleType, device_index: int = 0) -> None:
        self._rt = cudart
        # The runtime API works on the calling thread's current device: buffers, stream and the engine
        # (created after this) all land on `device_index`.
        self._check(cudart.cudaSetDevice(device_index), "cudaSetDevice")
        self._stream = self._check(
            cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )
        # name -> (device pointer, pinned host pointer, bytes, dtype)
        self._buffers: dict[str, tuple[int, int, int, np.dtype[Any]]] = {}

    def _check(self, result: Any, what: str) -> Any:
        # cuda-python returns (error, *values) from every call instead of raising.
        err, *values = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"{what} failed: {err}")
        return values[0] if values else None

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def allocate(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
        nbytes = math.prod(shape) * dtype.itemsize
        device = int(self._check(self._rt.cudaMalloc(nbytes), "cudaMalloc"))
        host = int(
            self._check(self._rt.cudaHostAlloc(nbytes, self._rt.cudaHostAllocDefault), "cudaHostAlloc")
        )
        self._buffers[name] = (device, host, nbytes, dtype)
        return device

    def upload(self, name: str, array: np.ndarray) -> None:
        device, host, nbytes, dtype = self._buffers[name]
        _host_view(host, nbytes, dtype)[: array.size] = array.reshape(-1)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(
            self._rt.cudaMemcpyAsync(device, host, array.nbytes, kind, self._stream), "cudaMemcpyAsync"
        )

    def download(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        device, host, nbytes, dtype = self._buffers[name]
        count = math.prod(shape)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(
            self._rt.cudaMemcpyAsync(host, device, count * dtype.itemsize, kind, self._stream),
            "cudaMemcpyAsync",
        )
        self.synchronize()
        # A copy: the staging buffer is rewritten by the next call.
        return _host_view(host, nbytes, dtype)[:count].reshape(shape).copy()

    def synchronize(self) -> None:
        self._check(self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def capture_graph(self, enqueue: Callable[[], None]) -> Any:
        """Record what `enqueue` queues on this stream as an instantiated graph (a cudaGraphExec_t)."""
        rt = self._rt
        # Thread-local mode, as trtexec uses: other threads' CUDA calls do not invalidate the capture.
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(rt.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        except BaseException:
            # Leave capture mode, or the stream stays unusable; the enqueue's error is the one to report.
            err, graph = rt.cudaStreamEndCapture(self._stream)
            if err == rt.cudaError_t.cudaSuccess and graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        graph = self._check(rt.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        try:
            # cudaGraphInstantiateWithFlags(graph, flags) has the same binding in CUDA 11.4+ and 12+,
            # unlike cudaGraphInstantiate, whose Python signature changed with CUDA 12.
            return self._check(rt.cudaGraphInstantiateWithFlags(graph, 0), "cudaGraphInstantiateWithFlags")
        finally:
            self._check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def launch_graph(self, graph: Any) -> None:
        self._check(self._rt.cudaGraphLaunch(graph, self._stream), "cudaGraphLaunch")

    def free_graph(self, graph: Any) -> None:
        self.synchronize()
        self._check(self._rt.cudaGraphExecDestroy(graph), "cudaGraphExecDestroy")

    def close(self) -> None:
        self.synchronize()
        for device, host, _, _ in self._buffers.values():
            self._check(self._rt.cudaFree(device), "cudaFree")
            self._check(self._rt.cudaFreeHost(host), "cudaFreeHost")
        self._buffers.clear()
        self._check(self._rt.cudaStreamDestroy(self._stream), "cudaStreamDestroy")


def _use_device(device_index: int) -> None:
    """Make CUDA device `device_index` current on this thread before TensorRT deserialises the plan:
    the engine's memory lands on the current device (torch's where torch has CUDA, else cuda-python's)."""
    try:
        with optional_import("TensorRT buffers held by torch"):
            import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(device_index)
            return
    except ImportError:
        pass
    cudart = import_cudart()
    if cudart is not None:
        (err,) = cudart.cudaSetDevice(device_index)
        if err != cudart.cudaError_t.cudaSuccess:
            raise MissingDependencyError(f"cudaSetDevice({device_index}) failed: {err}")


def _device_memory(device_index: int = 0) -> _DeviceMemory:
    """Buffers and a stream on CUDA device `device_index`: torch.cuda when torch with CUDA imports, else
    cuda-python; MissingDependencyError if neither."""
    try:
        with optional_import("TensorRT buffers held by torch"):
            import torch

        if torch.cuda.is_available():
            return _TorchMemory(torch.device("cuda", device_index))
    except ImportError:
        pass
    cudart = import_cudart()
    if cudart is not None:
        return _CudaPythonMemory(cudart, device_index)
    raise MissingDependencyError(
        "the TensorRT runner needs torch with CUDA or cuda-python for GPU buffers: pip install cuda-python"
    )


@dataclass
class _TrtGraph:
    """A graph for one batch shape and the execution context it was captured from.

    Each shape gets a context of its own, set to that shape once and never changed: a graph
    replays what the context queued at capture time, so the context must keep that state.
    """

    context: trt.IExecutionContext
    graph: Any  # torch.cuda.CUDAGraph or a cudaGraphExec_t, as the device memory made it
    output_shape: tuple[int, ...]


# How each TensorRT I/O type is held in a numpy buffer (by trt.DataType name). trt.nptype raises for
# the types numpy lacks; BF16 is carried as its raw 16 bits and converted here. FP8 and the packed
# 4-bit types have no conversion here: a plan with such I/O is refused by name.
_STORAGE_DTYPES: dict[str, type[np.generic]] = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "BF16": np.uint16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


def storage_dtype(type_name: str, tensor: str, plan_path: object) -> np.dtype[Any]:
    """The numpy dtype that holds a TensorRT I/O tensor of type `type_name` (a trt.DataType name);
    UsageError naming the tensor for a type this runner cannot convert (FP8, INT4, FP4, ...)."""
    if type_name not in _STORAGE_DTYPES:
        raise UsageError(
            f"{plan_path}: the plan's tensor {tensor!r} is {type_name}, which this runner cannot feed or read"
            f" (it handles {', '.join(_STORAGE_DTYPES)}); rebuild the engine with float32 or float16 I/O"
        )
    return np.dtype(_STORAGE_DTYPES[type_name])


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = np.where(np.isnan(values), bits | np.uint32(0x00400000), bits + rounding)  # NaN stays NaN
    return (rounded >> 16).astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32 values (exact)."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode_input(images: np.ndarray, type_name: str, dtype: np.dtype[Any]) -> np.ndarray:
    """A float32 batch as the input tensor's storage."""
    return to_bfloat16_bits(images) if type_name == "BF16" else images.astype(dtype, copy=False)


def decode_output(raw: np.ndarray, type_name: str) -> np.ndarray:
    """An output tensor's storage as float32."""
    return from_bfloat16_bits(raw) if type_name == "BF16" else raw.astype(np.float32, copy=False)


# TensorRT's floating-point I/O types (by trt.DataType name), which named outputs return as float32.
_FLOAT_TYPES = frozenset({"FLOAT", "HALF", "BF16"})


def decode_named_output(raw: np.ndarray, type_name: str) -> np.ndarray:
    """One of a plan's named outputs (`infer_outputs`) as the ONNX file typed it: floating-point
    storage as float32, integers and booleans as they are (a detector's int32 counts and classes)."""
    return decode_output(raw, type_name) if type_name in _FLOAT_TYPES else raw


def _dims(dims: Any) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints (Dims indexes like a tuple but is not one)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


class TensorRTRunner(CudaGraphReporting, Runner):
    """Runs a TensorRT plan built by `export.tensorrt_engine.build_engine` (or any plan with our sidecar).

    Args:
        plan_path: the plain serialized engine.
        sidecar: its sidecar; `<plan_path>.json` when None.
        device_index: the CUDA device to run on, counted among the visible devices (as
            CUDA_VISIBLE_DEVICES leaves them); the sidecar's GPU is checked against that one.

    Raises:
        UsageError: the plan or sidecar is missing or malformed, does not belong together, or was
            built for another TensorRT version or GPU (rebuild it here from the ONNX file).
        MissingDependencyError: TensorRT, a GPU, or a way to allocate GPU memory is missing.
    """

    backend = "tensorrt"
    device = "cuda"
    supports_cuda_graphs = True
    _graphs: CudaGraphCache[_TrtGraph]
    _addresses: dict[str, int]
    _memory: _DeviceMemory | None
    _context: trt.IExecutionContext | None
    _engine: trt.ICudaEngine | None
    _runtime: trt.Runtime | None
    _lock: threading.Lock
    _types: dict[str, str]  # I/O tensor -> its trt.DataType name
    _dtypes: dict[str, np.dtype[Any]]  # I/O tensor -> the numpy dtype of its buffer

    def __init__(
        self,
        plan_path: str | os.PathLike[str],
        *,
        sidecar: str | os.PathLike[str] | None = None,
        device_index: int = 0,
    ):
        self._init_state()
        self.device_index = device_index
        self.plan_path = Path(plan_path)
        if not self.plan_path.is_file():
            raise UsageError(f"{self.plan_path}: TensorRT plan not found")
        self.sidecar: Sidecar = read_sidecar(sidecar if sidecar is not None else sidecar_path(self.plan_path))
        self.precision = self.sidecar.precision
        gpu = require_tensorrt_and_gpu("running a TensorRT engine", device_index)

        with optional_import("TensorRT buffers held by torch"):
            import tensorrt as trt

        check_engine_compatible(
            self.sidecar, tensorrt_version=trt.__version__, gpu=gpu, plan_path=self.plan_path
        )
        data = self.plan_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sidecar.plan_sha256:
            raise UsageError(
                f"{self.plan_path}: the plan's sha256 differs from the one its sidecar records; "
                f"the two do not belong together: {REBUILD_HINT}"
            )
        self._logger = trt.Logger(trt.Logger.WARNING)
        _use_device(device_index)
        self._runtime = start_tensorrt(trt.Runtime, self._logger, "trt.Runtime", trt.__version__)
        if self.sidecar.compatibility == "version":
            # Version-compatible plans embed the lean runtime, host code TensorRT runs only when allowed.
            self._runtime.engine_host_code_allowed = True
        if self.sidecar.dla is not None:
            self._select_dla_core(self._runtime, self.sidecar.dla.core)
        plugins = [str(name) for name in self.sidecar.build.get("plugins", [])]
        register_tensorrt_plugins(trt.init_libnvinfer_plugins, self._logger, plugins, str(self.plan_path))
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise UsageError(f"{self.plan_path}: TensorRT could not deserialise the plan: {REBUILD_HINT}")
        self._engine = engine
        try:
            self._setup(engine)
        except BaseException:
            self.close()
            raise

    def _init_state(self) -> None:
        """What the runner holds before TensorRT is loaded: nothing, and its lock."""
        # Off until a caller (the benchmark) turns it on; see CudaGraphCache for what it changes.
        self.use_cuda_graphs = False
        self._graphs = CudaGraphCache(self._free_graph)
        self._addresses = {}
        self._memory = None
        self._context = None
        self._engine = None
        self._runtime = None
        # One call at a time: every context (the eager one and one per CUDA graph) reads and writes the
        # same device buffers and staging buffers, and all use optimisation profile 0, which TensorRT
        # allows only while no two of them run at once.
        self._lock = threading.Lock()

    def _select_dla_core(self, runtime: trt.Runtime, core: int) -> None:
        """Point `runtime` at the DLA core the plan was built for, which must exist here."""
        # tensorrt-stubs omits Runtime.num_DLA_cores, which TensorRT's Python API documents.
        available = int(getattr(runtime, "num_DLA_cores", 0))
        if core >= available:
            raise UsageError(
                f"{self.plan_path}: the plan was built for DLA core {core}, and this device has "
                f"{available} DLA core(s); {REBUILD_HINT}"
            )
        runtime.DLA_core = core

    def _setup(self, engine: trt.ICudaEngine) -> None:
        with optional_import("TensorRT buffers held by torch"):
            import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != list(self.sidecar.input_names) or sorted(outputs) != sorted(self.sidecar.output_names):
            raise UsageError(
                f"{self.plan_path}: the engine's tensors (inputs {inputs}, outputs {outputs}) differ "
                f"from its sidecar's; {REBUILD_HINT}"
            )
        self._input = inputs[0]
        self._output = "logits" if "logits" in outputs else outputs[0]
        low, _, high = (_dims(d) for d in engine.get_tensor_profile_shape(self._input, 0))
        self.min_batch, self.max_batch = low[0], high[0]
        self.input_shape = (high[1], high[2], high[3])
        self._types = {n: engine.get_tensor_dtype(n).name for n in names}
        self._dtypes = {n: storage_dtype(self._types[n], n, self.plan_path) for n in names}

        context = engine.create_execution_context()
        if context is None:
            raise RuntimeError(f"{self.plan_path}: TensorRT could not create an execution context")
        self._context = context
        memory = _device_memory(self.device_index)
        self._memory = memory
        # Buffers sized for the largest batch, allocated once: a smaller batch uses their leading part,
        # so tensor addresses never change between calls.
        if not context.set_input_shape(self._input, high):
            raise RuntimeError(f"{self.plan_path}: TensorRT rejected the profile's max shape {high}")
        for name in names:
            shape = high if name == self._input else _dims(context.get_tensor_shape(name))
            self._addresses[name] = memory.allocate(name, shape, self._dtypes[name])
            if not context.set_tensor_address(name, self._addresses[name]):
                raise RuntimeError(f"{self.plan_path}: TensorRT rejected the buffer for {name!r}")

    @property
    def engine(self) -> trt.ICudaEngine:
        """The deserialised engine, for tools that run it with a context of their own
        (benchmarks.trt_breakdown)."""
        if self._engine is None:
            raise UsageError(f"{self.name}: the runner is closed")
        return self._engine

    @property
    def stream_handle(self) -> int:
        """The CUDA stream inference is queued on (for timing with CUDA events)."""
        if self._memory is None:
            raise UsageError(f"{self.name}: the runner is closed")
        return self._memory.stream_handle

    def _infer(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._context is None or self._memory is None:
                raise UsageError(f"{self.name}: the runner is closed")
            batch = encode_input(images, self._types[self._input], self._dtypes[self._input])
            if not self.use_cuda_graphs:
                return self._run_eager(batch)
            return self._graphs.run(
                batch.shape,
                eager=lambda: self._run_eager(batch),
                capture=lambda: self._capture(batch.shape),
                replay=lambda graph: self._replay(graph, batch),
            )

    def _enqueue(self, batch: np.ndarray) -> None:
        """Upload `batch` (input storage) and run the eager context on it."""
        assert self._context is not None and self._memory is not None  # checked by the caller
        if not self._context.set_input_shape(self._input, batch.shape):
            raise RuntimeError(f"{self.plan_path}: TensorRT rejected input shape {batch.shape}")
        self._memory.upload(self._input, batch)
        if not self._context.execute_async_v3(self._memory.stream_handle):
            raise RuntimeError(f"{self.plan_path}: TensorRT execution failed")

    def _download(self, name: str) -> np.ndarray:
        """An output of the eager context's last run, at the shape it ran with, as stored."""
        assert self._context is not None and self._memory is not None  # checked by the caller
        return self._memory.download(name, _dims(self._context.get_tensor_shape(name)))

    def _run_eager(self, batch: np.ndarray) -> np.ndarray:
        self._enqueue(batch)
        return decode_output(self._download(self._output), self._types[self._output])

    def _infer_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output by name (the sidecar's order), eagerly: CUDA graphs serve `infer` alone."""
        with self._lock:
            if self._context is None or self._memory is None:
                raise UsageError(f"{self.name}: the runner is closed")
            self._enqueue(encode_input(images, self._types[self._input], self._dtypes[self._input]))
            return {
                name: decode_named_output(self._download(name), self._types[name])
                for name in self.sidecar.output_names
            }

    def _capture(self, shape: tuple[int, ...]) -> _TrtGraph:
        """Capture one `execute_async_v3` at `shape` on a new context bound to the shared buffers."""
        assert self._engine is not None and self._memory is not None  # checked by _infer
        memory = self._memory
        context = self._engine.create_execution_context()
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context for the graph")
        if not context.set_input_shape(self._input, shape):
            raise RuntimeError(f"TensorRT rejected input shape {shape}")
        for name, address in self._addresses.items():
            if not context.set_tensor_address(name, address):
                raise RuntimeError(f"TensorRT rejected the buffer for {name!r}")
        # TensorRT's guide: enqueue once after a shape change, so the context has updated its internal
        # state and allocated what it needs, before the capture, where neither is allowed.
        if not context.execute_async_v3(memory.stream_handle):
            raise RuntimeError("TensorRT execution failed before the capture")
        memory.synchronize()

        def enqueue() -> None:
            if not context.execute_async_v3(memory.stream_handle):
                raise RuntimeError("TensorRT execution failed during the capture")

        graph = memory.capture_graph(enqueue)
        return _TrtGraph(context, graph, _dims(context.get_tensor_shape(self._output)))

    def _replay(self, graph: _TrtGraph, batch: np.ndarray) -> np.ndarray:
        assert self._memory is not None  # checked by _infer
        # The graph reads the input buffer and writes the output buffer the eager path uses, so the
        # copies in and out are the eager path's own.
        self._memory.upload(self._input, batch)
        self._memory.launch_graph(graph.graph)
        logits = self._memory.download(self._output, graph.output_shape)
        return decode_output(logits, self._types[self._output])

    def _free_graph(self, graph: _TrtGraph) -> None:
        if self._memory is not None:
            self._memory.free_graph(graph.graph)

    def synchronize(self) -> None:
        """Wait for the work queued on this runner's stream."""
        if self._memory is not None:
            self._memory.synchronize()

    def close(self) -> None:
        """Free the execution context, engine, runtime and device buffers. Safe to call twice, and
        waits for a call in another thread to finish."""
        with self._lock:
            # Graphs go first: they replay work queued into the contexts and buffers freed below.
            self._graphs.clear()
            memory, self._memory = self._memory, None
            if memory is not None:
                memory.synchronize()
            # TensorRT objects go before the memory they point into, the context before its engine.
            self._context = None
            self._engine = None
            self._runtime = None
            if memory is not None:
                memory.close()
