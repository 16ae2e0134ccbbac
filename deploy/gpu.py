"""The one GPU probe: which CUDA device is here, asked without importing torch.

Engines are tied to the GPU that built them, reports record the GPU a number was measured on,
and `--device auto` picks it: all of them ask `current_gpu`. It asks, in order, torch (only when
the process has already imported it: importing torch costs seconds, and a serving device may not
have it), cuda-python's runtime, NVML, then nvidia-smi.

Device indices are CUDA's: the index among the devices `CUDA_VISIBLE_DEVICES` leaves visible, as
torch, the CUDA runtime and ONNX Runtime count them. NVML and nvidia-smi number the physical GPUs
and ignore that variable, so their probes map the index through it first (by index or GPU UUID).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from deploy.optional import optional_module


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
        module = optional_module(name)
        if module is not None:
            return module
    return None


# What the CUDA runtime's commonest errors mean for someone looking for their GPU.
_CUDA_ERROR_HINTS = {
    "cudaErrorInsufficientDriver": (
        "the NVIDIA driver is missing, or older than the CUDA major these bindings were built for: "
        "cuda-bindings 13 needs a CUDA 13 driver (>= 580); with a CUDA 12 driver install the CUDA 12 "
        "target, pip install 'reviewkd[cuda12]'; `reviewkd doctor` checks every package against the driver"
    ),
    "cudaErrorNoDevice": "no CUDA device is visible: check CUDA_VISIBLE_DEVICES or the container's GPUs",
    "cudaErrorDevicesUnavailable": "every CUDA device is busy or in exclusive-process mode",
}


class GpuProbeError(Exception):
    """One probe's reason for finding no GPU, e.g. the CUDA error code it got."""


def visible_device(index: int, environ: dict[str, str] | None = None) -> int | str:
    """The physical GPU (an NVML/nvidia-smi index, or a "GPU-..." UUID) behind CUDA device `index`.

    GpuProbeError when CUDA_VISIBLE_DEVICES hides every device, has fewer than index + 1 entries, or
    names a MIG instance (which NVML and nvidia-smi do not list as a GPU).
    """
    env = os.environ if environ is None else environ
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return index
    # CUDA reads the list up to the first invalid entry; "-1" or "" hide every device.
    entries: list[int | str] = []
    for item in (part.strip() for part in raw.split(",")):
        if item.isdigit():
            entries.append(int(item))
        elif item.startswith("GPU-"):
            entries.append(item)
        elif item.startswith("MIG-"):
            raise GpuProbeError(f"CUDA_VISIBLE_DEVICES names a MIG instance ({item}), not a whole GPU")
        else:
            break
    if index >= len(entries):
        raise GpuProbeError(
            f"CUDA_VISIBLE_DEVICES={raw!r} leaves {len(entries)} device(s) visible, so no CUDA device {index}"
        )
    return entries[index]


@dataclass(frozen=True)
class GpuProbe:
    """The CUDA device found, or why each probe found none."""

    gpu: GpuInfo | None
    reasons: tuple[str, ...] = ()

    def describe_failure(self) -> str:
        """One line of the probes' reasons, for an error message."""
        return "; ".join(self.reasons) if self.reasons else "no probe ran"


def cuda_error_reason(call: str, error: Any) -> str:
    """'call returned cudaErrorX (what it usually means)' for a cuda-python error value."""
    name = getattr(error, "name", None) or str(error)
    hint = _CUDA_ERROR_HINTS.get(name)
    return f"{call} returned {name}" + (f" ({hint})" if hint else "")


def _text(name: str | bytes) -> str:
    return name.split(b"\0", 1)[0].decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def _from_torch(index: int) -> GpuInfo:
    torch = sys.modules.get("torch")
    if torch is None:
        # Importing torch costs seconds and a serving device may not have it: ask it only when loaded.
        raise GpuProbeError("torch: not loaded by this process")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise GpuProbeError(f"torch {torch.__version__} is a CPU-only build")
        try:
            torch.cuda.init()  # raises with torch's own reason (no driver, driver too old, no device)
        except Exception as exc:
            raise GpuProbeError(f"torch {torch.__version__}: {str(exc).splitlines()[0]}") from None
        raise GpuProbeError(f"torch {torch.__version__} sees no CUDA device")
    if index >= torch.cuda.device_count():
        raise GpuProbeError(f"torch sees {torch.cuda.device_count()} CUDA device(s), so no device {index}")
    major, minor = torch.cuda.get_device_capability(index)
    return GpuInfo(torch.cuda.get_device_name(index), (int(major), int(minor)), torch.cuda.device_count())


def _from_cuda_python(index: int) -> GpuInfo:
    cudart = import_cudart()
    if cudart is None:
        raise GpuProbeError("cuda-python is not installed")
    success = cudart.cudaError_t.cudaSuccess
    err, count = cudart.cudaGetDeviceCount()
    if err != success:
        raise GpuProbeError(f"cuda-python: {cuda_error_reason('cudaGetDeviceCount', err)}")
    if count < 1:
        raise GpuProbeError("cuda-python: cudaGetDeviceCount found 0 devices")
    if index >= count:
        raise GpuProbeError(f"cuda-python: cudaGetDeviceCount found {count} device(s), so no device {index}")
    err, prop = cudart.cudaGetDeviceProperties(index)
    if err != success:
        raise GpuProbeError(f"cuda-python: {cuda_error_reason('cudaGetDeviceProperties', err)}")
    return GpuInfo(_text(prop.name), (int(prop.major), int(prop.minor)), int(count))


def _from_nvml(index: int) -> GpuInfo:
    physical = visible_device(index)
    pynvml = optional_module("pynvml")
    if pynvml is None:
        raise GpuProbeError("NVML (pynvml) is not installed")
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count < 1:
            raise GpuProbeError("NVML found 0 devices")
        # NVML numbers devices physically and ignores CUDA_VISIBLE_DEVICES: visible_device mapped it.
        if isinstance(physical, str):
            handle = pynvml.nvmlDeviceGetHandleByUUID(physical)
        elif physical < count:
            handle = pynvml.nvmlDeviceGetHandleByIndex(physical)
        else:
            raise GpuProbeError(f"NVML found {count} device(s), so no physical GPU {physical}")
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
    finally:
        pynvml.nvmlShutdown()
    return GpuInfo(_text(name), (int(major), int(minor)), int(count), _text(driver))


def _from_nvidia_smi(index: int) -> GpuInfo:
    physical = visible_device(index)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise GpuProbeError("nvidia-smi is not on PATH")
    out = subprocess.run(
        [exe, "--query-gpu=index,uuid,name,compute_cap,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return parse_nvidia_smi_gpus(out, physical)


def parse_nvidia_smi_gpus(out: str, physical: int | str) -> GpuInfo:
    """The row of `nvidia-smi --query-gpu=index,uuid,name,compute_cap,driver_version` for the physical
    GPU `physical` (its index, or its UUID)."""
    rows = [[part.strip() for part in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    rows = [row for row in rows if len(row) >= 5]
    if not rows:
        raise GpuProbeError("nvidia-smi listed no GPU")
    key = 1 if isinstance(physical, str) else 0
    found = [row for row in rows if row[key] == str(physical)]
    if not found:
        raise GpuProbeError(f"nvidia-smi lists {len(rows)} GPU(s), none of them physical GPU {physical}")
    name, capability, driver = found[0][2:5]
    major, _, minor = capability.partition(".")
    return GpuInfo(name, (int(major), int(minor or 0)), len(rows), driver)


_PROBES: tuple[tuple[str, Callable[[int], GpuInfo]], ...] = (
    ("torch", _from_torch),
    ("cuda-python", _from_cuda_python),
    ("NVML", _from_nvml),
    ("nvidia-smi", _from_nvidia_smi),
)


def probe_gpu(index: int = 0) -> GpuProbe:
    """CUDA device `index` (counted among the visible devices), or each probe's reason for finding
    none (a CUDA error code where one was returned)."""
    reasons: list[str] = []
    for label, probe in _PROBES:
        try:
            return GpuProbe(probe(index), tuple(reasons))
        except GpuProbeError as exc:
            reasons.append(str(exc))
        # A broken driver or CUDA install surfaces as many exception types (RuntimeError, OSError,
        # NVMLError, subprocess errors); any of them means this probe cannot tell: say why, ask the next.
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reasons.append(f"{label}: {type(exc).__name__}" + (f": {first_line}" if first_line else ""))
    return GpuProbe(None, tuple(reasons))


def current_gpu(index: int = 0) -> GpuInfo | None:
    """CUDA device `index`, or None if no probe finds one."""
    return probe_gpu(index).gpu
