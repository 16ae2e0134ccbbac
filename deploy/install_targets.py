"""The supported installs: one pip command per target, each with exactly one ONNX Runtime and one CUDA major.

ONNX Runtime ships as several distributions (onnxruntime, onnxruntime-gpu, ...) that all write the
same `onnxruntime/` package folder, so at most one may be installed; whichever pip installs last wins.
The core of reviewkd therefore requires none of them: each target's extra names the one it runs
(`cpu`, `cuda12`, `cuda13`), and a Jetson keeps NVIDIA's own wheel and JetPack's TensorRT.

The CUDA majors (from each package's declared requirements on PyPI, checked by
tests/test_install_targets.py with pip's resolver):
- onnxruntime-gpu 1.19 to 1.26 are CUDA 12 builds; 1.27 and later are CUDA 13 builds;
- TensorRT's PyPI packages name their CUDA major: tensorrt-cu12, tensorrt-cu13 (the bare `tensorrt`
  metapackage installs the CUDA 13 one);
- cuda-bindings' major is its CUDA major (cuda-python 12 also ships `cuda/bindings` files, so it is not
  used: beside a cuda-bindings 13 it leaves a mixed package);
- torch from PyPI declares its CUDA libraries: 2.14 requires cuda-bindings 13, 2.10 cuda-bindings 12.9,
  so an extra that bounds cuda-bindings makes the resolver pick a torch of the same major.
This module is the one place that spells the targets in code: `reviewkd doctor`, the error
messages and tests/test_install_targets.py read it (the README's install table is written by hand).
"""

from __future__ import annotations

from dataclasses import dataclass

PROJECT = "reviewkd"

# Every distribution that installs the `onnxruntime` import package (at most one may be installed).
ONNXRUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-training",
    "ort-nightly",
    "ort-nightly-gpu",
)

# The oldest driver branch that runs each CUDA major (NVIDIA's CUDA toolkit release notes).
MIN_LINUX_DRIVER = {12: "525.60.13", 13: "580.65.06"}


@dataclass(frozen=True)
class InstallTarget:
    """One kind of machine: the pyproject extra that installs reviewkd's serving core for it, the ONNX
    Runtime distribution that extra brings and the CUDA major of its runtimes."""

    extra: str
    onnxruntime: str
    cuda_major: int | None  # None: no CUDA

    @property
    def command(self) -> str:
        """The pip command for the edge core on this target (add `,train` to the extra to train)."""
        return f"pip install '{PROJECT}[{self.extra}]'"


TARGETS: dict[str, InstallTarget] = {
    target.extra: target
    for target in (
        # CPU only, x86_64 or aarch64.
        InstallTarget("cpu", "onnxruntime", None),
        # x86_64 NVIDIA GPU with a CUDA 12 driver (>= 525): tensorrt-cu12, onnxruntime-gpu 1.19-1.26,
        # cuda-bindings 12; with `train`, a CUDA 12 torch (<= 2.10 on PyPI).
        InstallTarget("cuda12", "onnxruntime-gpu", 12),
        # x86_64 NVIDIA GPU with a CUDA 13 driver (>= 580): tensorrt-cu13, onnxruntime-gpu >= 1.27,
        # cuda-bindings 13; with `train`, PyPI's CUDA 13 torch.
        InstallTarget("cuda13", "onnxruntime-gpu", 13),
        # Jetson on JetPack 6 (CUDA 12): JetPack's TensorRT and NVIDIA's onnxruntime-gpu wheel,
        # installed first; the extra adds cuda-bindings 12 only, never a runtime from the index.
        InstallTarget("jetson", "onnxruntime-gpu", 12),
    )
}


def target_for_driver(driver_cuda_major: int | None) -> InstallTarget:
    """The x86_64 GPU target a driver supports (the newest CUDA major it runs), or the CPU target."""
    if driver_cuda_major is None or driver_cuda_major < 12:
        return TARGETS["cpu"]
    return TARGETS["cuda13"] if driver_cuda_major >= 13 else TARGETS["cuda12"]


# What every "install the GPU packages" message says: the command per driver, and a Jetson's way.
GPU_INSTALL_HINT = (
    f"{TARGETS['cuda13'].command} with a CUDA 13 driver, {TARGETS['cuda12'].command} with a CUDA 12"
    " one (on a Jetson, TensorRT and onnxruntime-gpu come with JetPack); `reviewkd doctor` says which"
)
