"""First contact with a CUDA GPU: every GPU path of the project, run once, results in one JSON file.

    python -m benchmarks.scripts.gpu_first_contact [--out DIR] [--budget-s 480]

Run this first on a machine with an NVIDIA GPU (any torch >= 2.4 with CUDA; TensorRT and internet
are not needed). It takes under 9 minutes on one H100/H200. Each step runs in its own try block, so
one failure never hides the others, and DIR/gpu_first_contact.json is rewritten after every step
(a kill keeps what ran). The steps:

 0. doctor: `reviewkd doctor`'s findings (ONNX Runtimes installed, each package's CUDA major against
    the driver's, the GPU paths), read from package metadata before anything imports torch;
 1. environment: versions, driver, GPU, ONNX Runtime's providers, the GPU probe;
 2. tf32_drift: a small CNN in fp32 with TF32 on and off, against the CPU and the 1e-4 fp32 gate;
 3. memory_torch / memory_cuda_python: the TensorRT runner's two device-memory classes: upload,
    download, stream flags, pinned staging, and capture + replay of stand-in kernels on their stream;
 4. tensorrt_runner_fake_engine: the TensorRT runner's buffer, CUDA-graph and locking logic over a
    stand-in engine whose enqueue launches real kernels (TensorRT itself is not needed);
 5. pytest_gpu: `pytest -m gpu` (skipped, saying so, where pytest is not installed);
 6. timing: CUDA-event against perf_counter timing of the same runner;
 7. onnxruntime_cuda: ONNX Runtime's CUDA provider against its CPU one, if the provider exists;
 8. amp_auto: what train.amp=auto picks on this GPU, with the facts it depends on;
 9. distill_*: `reviewkd distill` on digits on CUDA with bf16 and channels_last, resumed with fp16
    (GradScaler), then resumed on the CPU; the engine's own images/s come from metrics.jsonl;
10. export_check_device: `reviewkd export` of that digits run with --check-device cpu and auto:
    where auto computed (the PyTorch reference on CUDA, the files on onnxruntime-gpu's CUDA provider
    where it loads), the same verdicts, the fp32 parity and the reference's time on each;
11. distill_compile: a time-boxed epoch with train.compile=true.

Without a usable CUDA GPU it records the doctor's findings and the reason in the JSON file, prints
one line saying why (with the CUDA error code where there is one) and exits with 3: a first run on a
machine whose driver is too old for its packages still says which package and which fix. Steps
that run the training engine go through the `reviewkd` CLI, so this script does not depend on the
engine's internals; nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.environment import library_versions
from benchmarks.latency import CudaEventTimer, PerfCounterTimer, latency_stats, time_runner
from deploy.doctor import collect, diagnose
from deploy.errors import MissingDependencyError
from deploy.fileio import write_json_atomic
from deploy.gpu import import_cudart, probe_gpu
from deploy.optional import optional_import, optional_module
from deploy.runners import tensorrt_runner
from deploy.runners.onnxruntime_runner import (
    CUDA_PROVIDER,
    OnnxRuntimeRunner,
    libnvinfer_loadable,
    providers_for_device,
)
from deploy.runners.tensorrt_runner import _CudaPythonMemory, _TorchMemory
from deploy.trt_sidecar import host_machine, tensorrt_available
from reviewkd.config import load_config

REPO = Path(__file__).resolve().parents[2]
RESULT_FILE = "gpu_first_contact.json"
FP32_GATE = 1e-4  # export/check.py's fp32 gate: max |diff| of logits
# The stand-in engine: input (N, 3, 8, 8), logits (N, 10) = 2 * the first 10 input values of each image.
CHW = (3, 8, 8)
CLASSES = 10
MAX_BATCH = 8
DIGITS_EPOCHS = (1, 2, 3)  # the first run, then each resume adds one epoch


def no_gpu_reason() -> str | None:
    """Why no CUDA GPU is usable here (torch's and the GPU probe's words), or None when one is."""
    torch = optional_module("torch")
    if torch is None:
        return "torch is not installed; install the project (pip install -e .) with a CUDA build of torch"
    if torch.cuda.is_available():
        return None

    return f"no usable CUDA GPU: {probe_gpu().describe_failure()}"


class Recorder:
    """Runs named steps in their own try blocks and keeps every result in one JSON file."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path = path
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, Any] = {
            "script": "benchmarks/scripts/gpu_first_contact.py",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "budget_s": budget_s,
            "steps": {},
        }

    def left_s(self) -> float:
        """Seconds left of the budget."""
        return self.deadline - time.monotonic()

    def step(self, name: str, run: Callable[[], dict[str, Any]], *, needs_s: float = 0.0) -> None:
        """Run `run` and record its result, its error (with the traceback's tail) or why it was skipped."""
        if self.left_s() < needs_s:
            entry: dict[str, Any] = {"status": "skipped", "reason": f"under {needs_s:.0f} s of budget left"}
        else:
            start = time.perf_counter()
            try:
                entry = {"status": "ok", **run()}
            except Exception as exc:
                entry = {
                    "status": "error",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc().splitlines()[-12:],
                }
            entry["seconds"] = round(time.perf_counter() - start, 2)
        self.results["steps"][name] = entry
        print(f"[{name}] {entry['status']}" + (f": {entry['error']}" if "error" in entry else ""), flush=True)
        self.save()

    def save(self) -> None:
        """Write everything so far."""
        write_json_atomic(self.path, self.results)


# --------------------------------------------------------------------------- 1. environment


def environment() -> dict[str, Any]:
    """Versions, driver, GPU, ONNX Runtime's providers, and what the GPU probe and TensorRT check say."""
    with optional_import("the GPU first-contact checks"):
        import onnxruntime as ort
        import torch


    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": host_machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": {
            "name": torch.cuda.get_device_name(0),
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        },
        "libraries": library_versions(),
        "onnxruntime_providers": ort.get_available_providers(),
        "libnvinfer_loadable": libnvinfer_loadable(),
        "tensorrt": tensorrt_available()[1],
        "gpu_probe": repr(probe_gpu()),
    }
    cudart = import_cudart()
    if cudart is not None:
        err, version = cudart.cudaDriverGetVersion()
        info["cuda_driver_api_version"] = version if err == cudart.cudaError_t.cudaSuccess else repr(err)
    try:
        query = "--query-gpu=name,driver_version,compute_cap,memory.total"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        info["nvidia_smi"] = smi.stdout.strip().splitlines() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
    return info


# --------------------------------------------------------------------------- 2. TF32 drift


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for cuDNN convolutions and cuBLAS matmuls on or off, restored afterwards."""
    with optional_import("the GPU first-contact checks"):
        import torch

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def small_cnn(seed: int = 0) -> Any:
    """conv-relu-conv-relu-pool-linear: the convolutions and the matmul TF32 would touch."""
    with optional_import("the GPU first-contact checks"):
        import torch
        from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 100),
    ).eval()  # fmt: skip


def tf32_drift() -> dict[str, Any]:
    """max |GPU fp32 - CPU fp32| of a small CNN's logits with TF32 on and off, against the 1e-4 gate."""
    with optional_import("the GPU first-contact checks"):
        import torch

    model = small_cnn()
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = model(images)
        gpu_model, gpu_images = model.cuda(), images.cuda()
        drift = {}
        for enabled in (True, False):
            with tf32(enabled):
                gpu = gpu_model(gpu_images).cpu()
            drift["tf32_on" if enabled else "tf32_off"] = float((gpu - cpu).abs().max())
    return {
        "max_abs_diff_vs_cpu": drift,
        "gate": FP32_GATE,
        "passes_gate": {key: value <= FP32_GATE for key, value in drift.items()},
        "torch_defaults": {
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        },
    }


# ------------------------------------------------------------------ 3./4. memory classes, stand-in engine


class _CudaArray:
    """Describes device memory at an address through __cuda_array_interface__, so torch can wrap it."""

    def __init__(self, address: int, shape: tuple[int, ...], typestr: str = "<f4") -> None:
        self.__cuda_array_interface__ = {
            "data": (address, False),
            "shape": shape,
            "typestr": typestr,
            "strides": None,
            "version": 3,
        }


def device_tensor(address: int, shape: tuple[int, ...]) -> Any:
    """A float32 torch tensor over device memory the runner allocated (no copy)."""
    with optional_import("the GPU first-contact checks"):
        import torch

    return torch.as_tensor(_CudaArray(address, shape), device="cuda")


def stand_in_kernel(images: Any, logits: Any, batch: int, stream_handle: int) -> None:
    """Queue logits[:batch] = 2 * the first CLASSES values of each image on `stream_handle`.

    Written with `out=` so that nothing is allocated: it must be capturable into a CUDA graph.
    """
    with optional_import("the GPU first-contact checks"):
        import torch

    flat = images.view(images.shape[0], -1)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)):
        torch.mul(flat[:batch, :CLASSES], 2.0, out=logits[:batch])


def expected_logits(batch: np.ndarray) -> np.ndarray:
    """What the stand-in kernel computes, in numpy."""
    return 2.0 * batch.reshape(batch.shape[0], -1)[:, :CLASSES]


def memory_class_check(memory: Any, cudart: types.ModuleType | None) -> dict[str, Any]:
    """Upload, download, stream flags, pinned staging and a captured + replayed stand-in kernel."""
    rng = np.random.default_rng(0)
    in_address = memory.allocate("images", (MAX_BATCH, *CHW), np.dtype(np.float32))
    out_address = memory.allocate("logits", (MAX_BATCH, CLASSES), np.dtype(np.float32))
    result: dict[str, Any] = {"stream_handle_nonzero": memory.stream_handle != 0}
    if cudart is not None:
        err, flags = cudart.cudaStreamGetFlags(memory.stream_handle)
        result["stream_non_blocking"] = (
            bool(int(flags) & cudart.cudaStreamNonBlocking)
            if err == cudart.cudaError_t.cudaSuccess
            else repr(err)
        )
    batch = rng.standard_normal((5, *CHW)).astype(np.float32)
    memory.upload("images", batch)
    round_trip = memory.download("images", batch.shape)
    result["upload_download_equal"] = bool(np.array_equal(round_trip, batch))
    images = device_tensor(in_address, (MAX_BATCH, *CHW))
    logits = device_tensor(out_address, (MAX_BATCH, CLASSES))

    # Eager once (the lazy set-up a capture forbids), then capture, then replay on new inputs.
    stand_in_kernel(images, logits, 5, memory.stream_handle)
    memory.synchronize()
    graph = memory.capture_graph(lambda: stand_in_kernel(images, logits, 5, memory.stream_handle))
    replays = []
    for seed in (1, 2, 3):
        fresh = np.random.default_rng(seed).standard_normal((5, *CHW)).astype(np.float32)
        memory.upload("images", fresh)
        memory.launch_graph(graph)
        replays.append(float(np.abs(memory.download("logits", (5, CLASSES)) - expected_logits(fresh)).max()))
    memory.free_graph(graph)
    result["replay_max_abs_diff"] = replays
    result["replay_correct"] = all(diff == 0.0 for diff in replays)
    memory.close()
    return result


def memory_torch() -> dict[str, Any]:
    """The torch.cuda memory class, with its staging tensors' pinning."""
    memory = _TorchMemory()
    memory.allocate("probe", (4,), np.dtype(np.float32))
    pinned = bool(memory._staging["probe"].is_pinned())
    result = memory_class_check(memory, import_cudart())
    return {"staging_pinned": pinned, **result}


def memory_cuda_python() -> dict[str, Any]:
    """The cuda-python memory class, with where its staging buffers live."""
    cudart = import_cudart()
    if cudart is None:
        return {"status_detail": "cuda-python is not installed; nothing to check"}
    memory = _CudaPythonMemory(cudart)
    memory.allocate("probe", (4,), np.dtype(np.float32))
    host = memory._buffers["probe"][1]
    err, attributes = cudart.cudaPointerGetAttributes(host)
    staging = repr(attributes.type) if err == cudart.cudaError_t.cudaSuccess else repr(err)
    return {"staging_memory_type": staging, **memory_class_check(memory, cudart)}


class StandInContext:
    """An execution context whose enqueue launches the stand-in kernel on the runner's buffers."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.tensors: dict[str, Any] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        self.shape = tuple(int(shape[i]) for i in range(len(shape)))
        return 1 <= self.shape[0] <= MAX_BATCH

    def set_tensor_address(self, name: str, address: int) -> bool:
        # Wrapped here, outside any capture, so that the enqueue itself only launches the kernel.
        shape = (MAX_BATCH, *CHW) if name == "images" else (MAX_BATCH, CLASSES)
        self.tensors[name] = device_tensor(address, shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shape if name == "images" else (self.shape[0], CLASSES)

    def execute_async_v3(self, stream_handle: int) -> bool:
        stand_in_kernel(self.tensors["images"], self.tensors["logits"], self.shape[0], stream_handle)
        return True


class StandInEngine:
    """The ICudaEngine calls the TensorRT runner makes, for one fp32 input and one fp32 output."""

    num_io_tensors = 2

    def get_tensor_name(self, index: int) -> str:
        return ("images", "logits")[index]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == "images" else "output"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, *CHW), (4, *CHW), (MAX_BATCH, *CHW)]

    def get_tensor_dtype(self, name: str) -> str:
        return "float32"

    def create_execution_context(self) -> StandInContext:
        return StandInContext()


def stand_in_runner(memory_factory: Callable[[], Any]) -> Any:
    """A TensorRTRunner set up by its own `_setup` over the stand-in engine and real device memory."""
    fake_trt = types.ModuleType("tensorrt")
    fake_trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")  # type: ignore[attr-defined]
    fake_trt.nptype = lambda dtype: np.float32  # type: ignore[attr-defined]
    saved_trt, saved_factory = sys.modules.get("tensorrt"), tensorrt_runner._device_memory
    sys.modules["tensorrt"] = fake_trt
    tensorrt_runner._device_memory = memory_factory  # type: ignore[assignment]
    try:
        runner = tensorrt_runner.TensorRTRunner.__new__(tensorrt_runner.TensorRTRunner)
        runner._init_state()
        runner.plan_path = Path("stand-in.plan")
        runner.sidecar = types.SimpleNamespace(input_names=("images",), output_names=("logits",))  # type: ignore[assignment]
        runner.precision = "fp32"
        engine = StandInEngine()
        runner._engine = engine  # type: ignore[assignment]
        runner._setup(engine)  # type: ignore[arg-type]
    finally:
        tensorrt_runner._device_memory = saved_factory  # type: ignore[assignment]
        if saved_trt is None:
            sys.modules.pop("tensorrt", None)
        else:
            sys.modules["tensorrt"] = saved_trt
    return runner


def drive_runner(runner: Any) -> dict[str, Any]:
    """Eager and graphed calls at interleaved batch sizes, then four threads at once."""
    rng = np.random.default_rng(0)
    runner.use_cuda_graphs = True
    diffs = []
    for batch in (2, 2, 8, 2, 8, 8, 1, 1, 1):
        x = rng.standard_normal((batch, *CHW)).astype(np.float32)
        diffs.append(float(np.abs(runner.infer(x) - expected_logits(x)).max()))
    wrong: list[int] = []

    def worker(index: int) -> None:
        x = np.full((4, *CHW), float(index), np.float32)
        for _ in range(50):
            if not np.array_equal(runner.infer(x), expected_logits(x)):
                wrong.append(index)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = {
        "max_abs_diff": max(diffs),
        "correct": max(diffs) == 0.0,
        "cuda_graph_shapes": [list(shape) for shape in runner.cuda_graph_shapes],
        "cuda_graph_error": runner.cuda_graph_error,
        "threads_wrong_results": len(wrong),
    }
    runner.close()
    return result


def tensorrt_runner_fake_engine() -> dict[str, Any]:
    """The TensorRT runner's buffers, graphs and lock over the stand-in engine, with both memory classes."""
    results: dict[str, Any] = {"torch": drive_runner(stand_in_runner(_TorchMemory))}
    cudart = import_cudart()
    if cudart is not None:
        results["cuda_python"] = drive_runner(stand_in_runner(lambda: _CudaPythonMemory(cudart)))
    return results


# --------------------------------------------------------------------------- 5. pytest -m gpu


def run_command(command: list[str], timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command from the repository root; its exit code and the output's last lines, with status
    "error" when it failed or timed out."""
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {
            "status": "error",
            "error": f"timed out after {timeout_s:.0f} s",
            "command": command,
            "tail": output[-3000:],
        }
    result: dict[str, Any] = {
        "command": command,
        "exit_code": done.returncode,
        "tail": (done.stdout + done.stderr)[-3000:],
    }
    if done.returncode != 0:
        # The step's status says so, and the output stays in the record beside it.
        result.update(status="error", error=f"exited with {done.returncode}")
    return result


def pytest_gpu(timeout_s: float) -> dict[str, Any]:
    """`pytest -m gpu`: the project's own GPU tests, skipped with the reason where pytest is missing
    (the `train` extra has none)."""
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed here: pip install pytest to run it"}
    return run_command(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], timeout_s
    )


# --------------------------------------------------------------------------- 6. timing


def timing() -> dict[str, Any]:
    """CUDA-event and perf_counter latencies of the same torch runner, batch 1 and 32."""
    with optional_import("the GPU first-contact checks"):
        from deploy.runners.torch_runner import TorchRunner

    results: dict[str, Any] = {}
    with TorchRunner(small_cnn(), (3, 32, 32), device="cuda") as runner:
        for batch in (1, 32):
            images = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
            row: dict[str, Any] = {}
            for timer in (CudaEventTimer(), PerfCounterTimer()):
                timings = time_runner(runner, images, warmup=20, iters=200, timer=timer)
                stats = latency_stats(timings.samples_ms, batch)
                row[timer.name] = {key: stats[key] for key in ("p50_ms", "mean_ms", "p99_ms")}
            row["mean_ratio_event_over_perf_counter"] = (
                row[CudaEventTimer.name]["mean_ms"] / row["perf_counter"]["mean_ms"]
            )
            results[f"batch_{batch}"] = row
    return results


# --------------------------------------------------------------------------- 7. ONNX Runtime on CUDA


def onnxruntime_cuda(out: Path) -> dict[str, Any]:
    """ONNX Runtime's CUDA provider against its CPU provider on the small CNN, and its options."""
    with optional_import("the GPU first-contact checks"):
        import onnxruntime as ort

        from export.onnx_export import export_fp32

    if CUDA_PROVIDER not in ort.get_available_providers():
        return {"status_detail": f"onnxruntime {ort.__version__} has no CUDA provider (CPU package)"}
    path = out / "small_cnn.onnx"
    export_fp32(small_cnn(), path, (3, 32, 32), {})
    images = np.random.default_rng(5).standard_normal((16, 3, 32, 32)).astype(np.float32)
    with OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"]) as cpu:
        expected = cpu.infer(images)
    try:
        gpu = OnnxRuntimeRunner(path, providers=providers_for_device("cuda"))
    except MissingDependencyError as exc:
        return {"cuda_provider_loads": False, "error_exit_3": str(exc)}
    with gpu:
        diff = float(np.abs(gpu.infer(images) - expected).max())
        options = gpu._session.get_provider_options()
        return {
            "cuda_provider_loads": True,
            "session_providers": gpu.providers,
            "cuda_use_tf32": options.get(CUDA_PROVIDER, {}).get("use_tf32"),
            "max_abs_diff_vs_cpu": diff,
            "passes_fp32_gate": diff <= FP32_GATE,
        }


# --------------------------------------------------------------------------- 8./9. training through the CLI


def distill(run_dir: Path, args: list[str], timeout_s: float) -> dict[str, Any]:
    """`reviewkd distill` on the embedded digits config; the engine's own metrics of the run."""
    result = run_command(
        [sys.executable, "-m", "reviewkd.app.cli", "distill", "--out", str(run_dir), *args], timeout_s
    )
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        metrics = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line]
        result["metrics"] = [
            {key: m.get(key) for key in ("epoch", "loss", "val_top1", "images_per_s")} for m in metrics
        ]
    return result


def distill_step(
    recorder: Recorder, run_dir: Path, run_args: list[str], cap_s: float
) -> Callable[[], dict[str, Any]]:
    """A step running `reviewkd distill` on digits for at most `cap_s` seconds or what the budget has left."""

    def run() -> dict[str, Any]:
        return distill(run_dir, [*run_args, "teacher.epochs=1"], min(cap_s, recorder.left_s()))

    return run


# --------------------------------------------------------------------------- 11. export's check device


# The ONNX files export_check_device makes: every ONNX flavour, no TensorRT engine (its builds would
# take the step's time, and `pytest -m gpu` covers them where TensorRT is installed).
EXPORT_FORMATS = "onnx,fp16,int8,int8-trt"
# What the step keeps of each check in the manifest.
CHECK_FIELDS = ("status", "device", "n", "max_abs_diff", "top1_agreement")


def export_check_device(
    run_dir: Path, out: Path, timeout_s: float, formats: str = EXPORT_FORMATS
) -> dict[str, Any]:
    """`reviewkd export --formats formats` of the trained run at `run_dir` with `--check-device cpu`
    and then `auto`, each on its own copy under `out`: where auto computed the PyTorch reference and
    ran the files, each file's verdict, images checked, fp32 parity and device on both, and the
    reference's time on both. Status "error" when an export failed, the two disagree on a verdict,
    or auto left a side on the CPU that this machine could run on its GPU (PyTorch sees one;
    onnxruntime lists its CUDA provider)."""
    if not (run_dir / "student.safetensors").is_file():
        return {"status": "skipped", "reason": f"{run_dir} has no trained student (its distill step failed)"}
    results: dict[str, Any] = {}
    for device in ("cpu", "auto"):
        copy = out / f"export_check_device_{device}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_dir, copy)
        command = [sys.executable, "-m", "reviewkd.app.cli", "export", str(copy), "--check-device", device]
        result = run_command([*command, "--formats", formats], timeout_s / 2)
        export = json.loads((copy / "manifest.json").read_text(encoding="utf-8")).get("export") or {}
        timing = export.get("timing") or {}
        result.update(
            check_device=export.get("check_device"),
            checks={
                rel: {key: check.get(key) for key in CHECK_FIELDS}
                for rel, check in (export.get("checks") or {}).items()
            },
            reference_stages=[s for s in timing.get("stages", []) if "reference" in s["stage"]],
            total_wall_s=timing.get("total_wall_s"),
            total_cpu_s=timing.get("total_cpu_s"),
        )
        results[device] = result
    judge_export_devices(results, gpu_sides())
    return results


def judge_export_devices(results: dict[str, Any], gpu_sides: dict[str, bool]) -> None:
    """Add `export_check_device`'s judgement to `results` (its "cpu" and "auto" exports):
    "same_verdicts", and status "error" with the reason when an export failed, the verdicts differ,
    or auto left on the CPU a side `gpu_sides` says this machine could run on its GPU."""
    verdicts = {
        device: {rel: check["status"] for rel, check in results[device]["checks"].items()}
        for device in ("cpu", "auto")
    }
    results["same_verdicts"] = bool(verdicts["cpu"]) and verdicts["cpu"] == verdicts["auto"]
    failed = [device for device in ("cpu", "auto") if results[device].get("status") == "error"]
    resolved = results["auto"].get("check_device") or {}
    left_on_cpu = [side for side, could in gpu_sides.items() if could and resolved.get(side) != "cuda"]
    if failed:
        results.update(status="error", error=f"export --check-device {' and '.join(failed)} failed")
    elif not results["same_verdicts"]:
        results.update(status="error", error="the verdicts differ between --check-device cpu and auto")
    elif left_on_cpu:
        notes = resolved.get("notes")
        results.update(status="error", error=f"auto left {' and '.join(left_on_cpu)} on the CPU: {notes}")


def gpu_sides() -> dict[str, bool]:
    """Which sides of export's --check-device this machine could put on its GPU: "torch" where PyTorch
    sees one, "onnxruntime" where onnxruntime lists its CUDA provider."""
    with optional_import("the GPU first-contact checks"):
        import onnxruntime as ort
        import torch

    return {"torch": torch.cuda.is_available(), "onnxruntime": CUDA_PROVIDER in ort.get_available_providers()}


def amp_auto() -> dict[str, Any]:
    """What train.amp=auto resolves to here, and the capability facts it should depend on."""
    with optional_import("the GPU first-contact checks"):
        import torch

    major, minor = torch.cuda.get_device_capability(0)
    facts: dict[str, Any] = {
        "compute_capability": f"{major}.{minor}",
        "is_bf16_supported": torch.cuda.is_bf16_supported(),
        # Native bf16 needs compute capability 8.0; below it torch may count emulation as support.
        "native_bf16": (major, minor) >= (8, 0),
    }
    try:
        facts["is_bf16_supported_without_emulation"] = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        facts["is_bf16_supported_without_emulation"] = "this torch has no including_emulation argument"
    with optional_import("the GPU first-contact checks"):
        from reviewkd.runtime import setup_runtime

    runtime = setup_runtime(load_config(None, ["train.amp=auto", "train.device=cuda"]))
    return {"amp_auto_picks": str(runtime.amp_dtype), **facts}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", REPO / "runs" / "gpu_first_contact")),
        help=f"folder for {RESULT_FILE} and the runs (default $OUT, else runs/gpu_first_contact)",
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="total time budget (default 480 s)")
    return parser.parse_args(argv)


def doctor() -> dict[str, Any]:
    """`reviewkd doctor`'s snapshot and findings (no torch import: package metadata and the driver)."""
    snapshot = collect()
    return {"machine": snapshot.machine, "gpu": snapshot.gpu, **diagnose(snapshot).as_dict()}


def main(argv: list[str] | None = None) -> int:
    """Record the doctor's findings, check for a GPU (exit 3 without one, with the reason in the JSON
    file too), run every step, write the JSON file; 0 unless a step erred."""
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(out / RESULT_FILE, args.budget_s)
    recorder.step("doctor", doctor)
    reason = no_gpu_reason()
    if reason is not None:
        recorder.results["no_gpu"] = reason
        recorder.save()
        print(f"gpu_first_contact: {reason} (findings in {recorder.path})", file=sys.stderr)
        return 3
    recorder.step("environment", environment)
    recorder.step("tf32_drift", tf32_drift)
    recorder.step("memory_torch", memory_torch)
    recorder.step("memory_cuda_python", memory_cuda_python)
    recorder.step("tensorrt_runner_fake_engine", tensorrt_runner_fake_engine)
    recorder.step("pytest_gpu", lambda: pytest_gpu(min(150.0, recorder.left_s())), needs_s=40)
    recorder.step("timing", timing, needs_s=30)
    recorder.step("onnxruntime_cuda", lambda: onnxruntime_cuda(out), needs_s=30)
    recorder.step("amp_auto", amp_auto)
    # One digits run on CUDA, resumed twice; teacher.epochs is repeated so that a resume after a first
    # run that stopped early still matches the teacher's config. Then its export, and a separate
    # compiled run.
    first, second, third = DIGITS_EPOCHS
    runs = (
        ("distill_cuda_bf16_channels_last", "digits", 150.0,
         ["--device", "cuda", "--epochs", str(first), "train.amp=bf16", "train.channels_last=true"]),
        ("distill_resume_cuda_fp16", "digits", 90.0,
         ["--resume", "--device", "cuda", "--epochs", str(second), "train.amp=fp16"]),
        ("distill_resume_cpu", "digits", 120.0,
         ["--resume", "--device", "cpu", "--epochs", str(third), "train.amp=none"]),
    )  # fmt: skip
    for name, folder, cap_s, run_args in runs:
        recorder.step(name, distill_step(recorder, out / folder, run_args, cap_s), needs_s=min(cap_s, 60.0))
    recorder.step(
        "export_check_device",
        lambda: export_check_device(out / "digits", out, min(180.0, recorder.left_s())),
        needs_s=120,
    )
    compiled = ["--device", "cuda", "--epochs", "1", "train.compile=true"]
    recorder.step(
        "distill_compile", distill_step(recorder, out / "digits_compile", compiled, 150.0), needs_s=60.0
    )
    recorder.results["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    recorder.save()
    print(f"wrote {recorder.path}")
    return 0 if all(s["status"] != "error" for s in recorder.results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
