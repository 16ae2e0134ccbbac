"""The environment block of bench.json and report.json: what the numbers were measured on.

Latency means little without the machine, so every measurement file records the CPU, the GPU
(if any), the versions of the libraries that ran the model and the thread settings.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.gpu import current_gpu

# Distributions whose versions change what a benchmark measures; absent ones are recorded as null.
LIBRARIES: tuple[str, ...] = (
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "torchvision",
    "tensorrt",
    "matplotlib",
)

# Environment variables that set thread pools behind the runtimes' backs.
THREAD_VARIABLES: tuple[str, ...] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cpu_model() -> str:
    """Return the CPU's marketing name (from /proc/cpuinfo on Linux), or the best platform guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Return the installed version of each distribution, or None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gpu_info() -> dict[str, Any] | None:
    """Return the GPU in use (name, compute capability, count, driver), or None when there is none."""
    gpu = current_gpu()
    return None if gpu is None else gpu.as_dict()


def thread_settings(threads: int | None = None) -> dict[str, Any]:
    """Return the thread settings a measurement ran with.

    `threads` is what the caller asked the runners for (None: each runtime's default). The
    environment variables and torch's intra-op pool (when torch is loaded) are recorded too,
    because they change CPU timings as much as the request does.
    """
    settings: dict[str, Any] = {"requested": threads}
    settings.update({var: os.environ.get(var) for var in THREAD_VARIABLES})
    torch = sys.modules.get("torch")
    if torch is not None:
        settings["torch_intra_op"] = torch.get_num_threads()
    return settings


def collect_environment(threads: int | None = None) -> dict[str, Any]:
    """Return the environment block: host, CPU, GPU, Python and library versions, threads."""
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": {
            "model": cpu_model(),
            "architecture": platform.machine(),
            "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "gpu": gpu_info(),
        "libraries": library_versions(),
        "threads": thread_settings(threads),
    }


def machine_text(environment: Mapping[str, Any]) -> str:
    """One line naming the machine of an environment block: host, CPU model and GPU, if any."""
    cpu = environment.get("cpu") or {}
    gpu = environment.get("gpu")
    text = f"{environment.get('host') or '-'}: {cpu.get('model') or '-'}"
    return text + (f", {gpu['name']}" if isinstance(gpu, Mapping) and gpu.get("name") else "")
