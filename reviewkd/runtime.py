"""Where a training process runs: device, mixed precision, and torchrun's process group.

Under torchrun (WORLD_SIZE > 1) `runtime_session` joins the process group (NCCL on CUDA, gloo on the
CPU) and leaves it again when training ends, whether it ended well or not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from deploy.errors import MissingDependencyError, UsageError
from reviewkd.config import Config

# bf16 runs natively from Ampere (compute capability 8.0) on; below, torch emulates it, slowly.
NATIVE_BF16_CAPABILITY = (8, 0)


@dataclass
class Runtime:
    """Where this process trains: device, distributed rank and mixed precision."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    owns_process_group: bool = False  # this process joined the group, so it leaves it

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the AMP dtype, or a no-op context."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def choose_amp(requested: str, capability: tuple[int, int] | None) -> str:
    """The AMP mode for train.amp=`requested` on a GPU of compute `capability` (None: no CUDA).

    "auto" is bf16 where the GPU runs it natively (capability >= 8.0) and none otherwise: below 8.0
    torch.cuda.is_bf16_supported() counts emulation, which is slower than fp32. fp16 (with a
    GradScaler) is never picked automatically; set train.amp=fp16 on Volta or Turing.

    Raises:
        UsageError: fp16 without CUDA.
    """
    if requested == "fp16" and capability is None:
        raise UsageError("config key train.amp: fp16 needs CUDA; use train.amp=bf16 or none on the CPU")
    if requested != "auto":
        return requested
    return "bf16" if capability is not None and capability >= NATIVE_BF16_CAPABILITY else "none"


def setup_runtime(config: Config) -> Runtime:
    """Pick the device and AMP mode from config.train and join torchrun's process group if launched so.

    Prefer `runtime_session`, which also leaves the group.

    Raises:
        MissingDependencyError: train.device=cuda without a usable CUDA GPU.
        UsageError: train.amp=fp16 without CUDA; train.sync_batchnorm on the CPU.
    """
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if tc.device == "cuda" and not cuda:
        raise MissingDependencyError(
            "train.device=cuda (--device cuda) but no CUDA GPU is usable here; "
            "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    use_cuda = tc.device == "cuda" or (tc.device == "auto" and cuda)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if tc.sync_batchnorm and world_size > 1 and not use_cuda:
        raise UsageError(
            "config key train.sync_batchnorm: SyncBatchNorm needs CUDA; set it to false on the CPU"
        )
    amp = choose_amp(tc.amp, torch.cuda.get_device_capability(device) if use_cuda else None)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    joins = world_size > 1 and not dist.is_initialized()
    if joins:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(device, rank, world_size, amp_dtype, tc.channels_last, owns_process_group=joins)


@contextlib.contextmanager
def runtime_session(config: Config) -> Iterator[Runtime]:
    """setup_runtime, and on leaving, destroy the process group this process joined."""
    runtime = setup_runtime(config)
    try:
        yield runtime
    finally:
        if runtime.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Inside, cuDNN convolutions and CUDA matrix products compute in full fp32, not TF32 (the default
    for convolutions on Ampere and newer, ~1e-3 from fp32: past the fp32 parity gate, 1e-4); the
    settings are restored on leaving. A reference that other files are checked against runs in it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def torch_cuda_missing() -> str | None:
    """Why PyTorch cannot compute on a CUDA GPU here, or None when it can: it must see one, and a 3x3
    convolution of ones must give 9 on it in full fp32 (a missing cuDNN, or a torch built without
    kernels for this GPU's architecture, shows only at the first kernel)."""
    version = f"torch {torch.__version__}"
    if not torch.cuda.is_available():
        return f"{version} sees no CUDA GPU"
    try:
        with exact_fp32():
            ones = torch.ones(1, 1, 3, 3, device="cuda")
            computed = float(torch.nn.functional.conv2d(ones, ones).item())
    except Exception as exc:  # CUDA, cuDNN and driver failures surface as several exception types
        lines = str(exc).strip().splitlines()
        return f"{version} cannot compute on its CUDA GPU: {lines[0] if lines else type(exc).__name__}"
    if computed != 9.0:
        return f"{version} computed a 3x3 convolution of ones on its CUDA GPU as {computed}, not 9"
    return None


def all_ranks_finite(values: list[torch.Tensor], runtime: Runtime) -> bool:
    """True when every value is finite on every rank; under DDP a collective, so all ranks agree.

    Each rank must call it at the same steps: one rank stopping alone would leave the others
    waiting in the next all-reduce forever.
    """
    finite = torch.stack([v.detach().float().reshape(()) for v in values]).isfinite().all()
    if not runtime.distributed:
        return bool(finite)
    flag = finite.to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)
