"""A run's student as a runner: the PyTorch reference that validate compares against, and predict's
"torch" backend. Imports torch only when called, so that importing this module stays cheap."""

from __future__ import annotations

from pathlib import Path

from deploy import run_layout
from deploy.errors import MissingDependencyError, UsageError
from deploy.manifest import Manifest, input_spec, model_block, verify_artifact
from deploy.optional import optional_import, require_installed
from deploy.runners.base import Runner


def open_student_runner(run: Path, manifest: Manifest, precision: str, device: str) -> Runner:
    """Build the run's student from the model zoo, load its hash-checked weights, and wrap it.

    precision "fp32" or "fp16" (fp16 runs on a CUDA GPU only); device "cpu" or "cuda".

    Raises:
        MissingDependencyError: torch is not installed, or fp16 was asked for without a GPU.
        UsageError: no weights, or a manifest without the student's architecture or input shape.
    """
    require_installed("torch", f"the PyTorch student (torch/{precision})")
    if precision == "fp16" and device != "cuda":
        raise MissingDependencyError(f"torch fp16 runs on a CUDA GPU; none is in use here (device {device})")
    with optional_import("the PyTorch student"):
        from deploy.runners.torch_runner import TorchRunner
        from reviewkd.models import create_model

    if run_layout.STUDENT_WEIGHTS in manifest.get("artifacts", {}):
        weights = verify_artifact(run, manifest, run_layout.STUDENT_WEIGHTS)
    else:
        weights = run_layout.run_path(run, run_layout.STUDENT_WEIGHTS)
    if not weights.is_file():
        raise UsageError(f"{weights}: no student weights; run `reviewkd distill` first")
    student = model_block(manifest, "student")
    if not student.arch:
        raise UsageError(f"{run / run_layout.MANIFEST}: no student architecture recorded")
    shape = input_spec(manifest).shape
    num_classes = student.num_classes or len(manifest.get("classes", []))
    if device == "cuda" and precision == "fp32":
        with optional_import("the PyTorch student"):
            import torch

        # cuDNN convolutions default to TF32 on Ampere and newer, which is not the fp32 reference
        # the 1e-4 parity gate compares against.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = create_model(student.arch, num_classes, weights=weights)
    return TorchRunner(model, shape, device=device, precision=precision)
