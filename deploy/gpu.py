"""The one GPU probe: which CUDA device is here, asked without importing torch.

Engines are tied to the GPU that built them, reports record the GPU a number was measured on,
and `--device auto` picks it: all of them ask `current_gpu`. It asks, in order, torch (only when
the process has already imported it: importing torch costs seconds, and a serving device may not
have it), cuda-python's runtime, NVML, then nvidia-smi.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA device: name and compute capability, plus what the probe could tell about the machine."""

    name: str
    compute_capability: tuple[int, int]
    count: int | None = field(default=None, compare=False)  # CUDA devices visible
    driver: str | None = field(default=None, compare=False)  # driver version, where the probe says

    @property
    def cc(self) -> str:
        """Compute capability as "major.minor", the form sidecars and reports store."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def as_dict(self) -> dict[str, object]:
        """The JSON form reports record."""
        return {"name": self.name, "compute_capability": self.cc, "count": self.count, "driver": self.driver}


def import_cudart() -> ModuleType | None:
    """cuda-python's CUDA runtime bindings (new and old module paths), or None when absent."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _text(name: str | bytes) -> str:
    return name.split(b"\0", 1)[0].decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def _from_torch() -> GpuInfo | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return GpuInfo(torch.cuda.get_device_name(index), (int(major), int(minor)), torch.cuda.device_count())


def _from_cuda_python() -> GpuInfo | None:
    cudart = import_cudart()
    if cudart is None:
        return None
    success = cudart.cudaError_t.cudaSuccess
    err, count = cudart.cudaGetDeviceCount()
    if err != success or count < 1:
        return None
    err, device = cudart.cudaGetDevice()
    if err != success:
        return None
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err != success:
        return None
    return GpuInfo(_text(prop.name), (int(prop.major), int(prop.minor)), int(count))


def _from_nvml() -> GpuInfo | None:
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count < 1:
            return None
        # NVML numbers devices physically and ignores CUDA_VISIBLE_DEVICES, hence after cuda-python.
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
    finally:
        pynvml.nvmlShutdown()
    return GpuInfo(_text(name), (int(major), int(minor)), int(count), _text(driver))


def _from_nvidia_smi() -> GpuInfo | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    rows = [[part.strip() for part in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    if not rows or len(rows[0]) < 3:
        return None
    name, capability, driver = rows[0][:3]
    major, _, minor = capability.partition(".")
    return GpuInfo(name, (int(major), int(minor or 0)), len(rows), driver)


PROBES: tuple[Callable[[], GpuInfo | None], ...] = (
    _from_torch,
    _from_cuda_python,
    _from_nvml,
    _from_nvidia_smi,
)


def current_gpu() -> GpuInfo | None:
    """The current CUDA device, or None if no probe finds one."""
    for probe in PROBES:
        try:
            info = probe()
        # A broken driver or CUDA install surfaces as many exception types (RuntimeError, OSError,
        # subprocess and library errors); any of them means this probe cannot tell: ask the next.
        except Exception:
            continue
        if info is not None:
            return info
    return None
