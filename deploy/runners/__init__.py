"""Runners: one contract (deploy.runners.base.Runner) over ONNX Runtime, TensorRT and PyTorch.

`open_runner` opens a deployable file by its suffix. The PyTorch runner wraps a module that the
caller has built; import it from `deploy.runners.torch_runner` (that pulls in torch, which this
package never does by itself).
"""

from __future__ import annotations

import os
from pathlib import Path

from deploy.errors import UsageError
from deploy.manifest import Manifest, artifacts_of_kind, verify_artifact
from deploy.runners.base import Runner
from deploy.runners.onnxruntime_runner import (
    GPU_PROVIDERS,
    OnnxRuntimeRunner,
    available_providers,
    precision_from_filename,
    providers_for_device,
)

__all__ = [
    "GPU_PROVIDERS",
    "OnnxRuntimeRunner",
    "Runner",
    "artifact_precision",
    "available_providers",
    "open_runner",
    "precision_from_filename",
    "providers_for_device",
    "run_relative_path",
    "select_artifact",
]

ONNX_SUFFIXES = (".onnx",)
TENSORRT_SUFFIXES = (".plan", ".engine")
# The manifest kind of each file backend, and the file name export gives each precision.
ARTIFACT_KINDS = {"onnxruntime": "onnx", "tensorrt": "tensorrt"}
_CANONICAL = {"onnx": "export/student.{}.onnx", "tensorrt": "export/student.{}.plan"}


def artifact_precision(relpath: str, entry: dict[str, object]) -> str:
    """An artifact's precision: the manifest entry's, else what its file name says."""
    precision = entry.get("precision")
    return precision if isinstance(precision, str) and precision else precision_from_filename(relpath)


def select_artifact(run_dir: str | os.PathLike[str], manifest: Manifest, backend: str, precision: str) -> str:
    """Return the run-relative path of the file that serves `backend` ("onnxruntime", "tensorrt")
    at `precision`.

    Several files may share a precision (export writes two int8 ONNX flavours, and a uint8-input
    fp32 variant); the one under export's standard name (export/student.onnx for fp32,
    export/student.<precision>.onnx otherwise, .plan for engines) wins. UsageError if none
    matches, listing what the run has, or if the choice is still ambiguous.
    """
    if backend not in ARTIFACT_KINDS:
        raise UsageError(f"backend {backend!r}: run files exist for {', '.join(ARTIFACT_KINDS)} only")
    kind = ARTIFACT_KINDS[backend]
    files = artifacts_of_kind(manifest, kind)
    matches = sorted(rel for rel, entry in files.items() if artifact_precision(rel, entry) == precision)
    canonical = (
        "export/student.onnx" if (kind, precision) == ("onnx", "fp32") else _CANONICAL[kind].format(precision)
    )
    if canonical in matches:
        return canonical
    if len(matches) == 1:
        return matches[0]
    if not matches:
        present = sorted({f"{backend}/{artifact_precision(rel, entry)}" for rel, entry in files.items()})
        raise UsageError(
            f"{run_dir}: no {backend}/{precision} file in the manifest"
            f" (has: {', '.join(present) or 'none; run `reviewkd export RUN` first'})"
        )
    raise UsageError(
        f"{run_dir}: several {backend}/{precision} files ({', '.join(matches)}); pass the file's path instead"
    )


def run_relative_path(
    path: str | os.PathLike[str], run_dir: str | os.PathLike[str], manifest: Manifest
) -> str:
    """Return the manifest key of `path`: either already a key, or a path inside `run_dir`."""
    candidate = Path(path)
    if not candidate.is_absolute() and candidate.as_posix() in manifest.get("artifacts", {}):
        return candidate.as_posix()
    try:
        return candidate.resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        raise UsageError(
            f"{candidate}: not inside the run {run_dir}; its manifest can only vouch for the run's files"
        ) from None


def open_runner(
    path: str | os.PathLike[str],
    *,
    manifest: Manifest | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> Runner:
    """Open a deployable file with the backend its suffix names (.onnx, .plan/.engine).

    With a manifest and its run directory, the file's sha256 is checked against the manifest
    first, and the precision and input shape come from the manifest. `device` ("cpu" or
    "cuda") picks ONNX Runtime's execution providers; a TensorRT plan always runs on its GPU.
    `threads` sets ONNX Runtime's intra-op threads.
    """
    if (manifest is None) != (run_dir is None):
        raise UsageError("open_runner: pass the manifest and its run directory together")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    file = Path(path)
    precision: str | None = None
    input_shape: tuple[int, int, int] | None = None
    if manifest is not None and run_dir is not None:
        relpath = run_relative_path(file, run_dir, manifest)
        file = verify_artifact(run_dir, manifest, relpath)
        precision = manifest["artifacts"][relpath].get("precision")
        shape = manifest.get("input", {}).get("shape")
        if shape:
            input_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    suffix = file.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return OnnxRuntimeRunner(
            file,
            providers=providers_for_device(device),
            threads=threads,
            precision=precision,
            input_shape=input_shape,
        )
    if suffix in TENSORRT_SUFFIXES:
        # Imported here: the TensorRT module is only needed, and only importable, on GPU machines.
        from deploy.runners.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(file)
    raise UsageError(
        f"{file}: unknown model file type {suffix or '(none)'!r}; expected .onnx, .plan or .engine"
        " (PyTorch weights are run through the reviewkd commands, which build the model)"
    )
