"""Runners: one contract (deploy.runners.base.Runner) over ONNX Runtime, TensorRT and PyTorch.

`open_runner` opens a deployable file by its suffix; `select_artifact` picks a run's file by
backend and precision. The PyTorch runner wraps a module that the caller has built; import it
from `deploy.runners.torch_runner` (that pulls in torch, which this package never does by itself).
"""

from __future__ import annotations

import os
from pathlib import Path

from deploy.errors import UsageError
from deploy.formats import (
    KIND_OF_BACKEND,
    export_advice,
    format_keys,
    kind_of_file,
    precision_from_filename,
    standard_file,
)
from deploy.gpu import current_gpu
from deploy.manifest import (
    ArtifactEntry,
    Manifest,
    artifacts_of_kind,
    check_manifests_agree,
    check_output_width,
    input_spec,
    verify_artifact,
)
from deploy.optional import optional_import
from deploy.runners.base import Runner
from deploy.runners.onnxruntime_runner import (
    CUDA_PROVIDER,
    GPU_PROVIDERS,
    OnnxRuntimeRunner,
    available_providers,
    providers_for_device,
)

__all__ = [
    "GPU_PROVIDERS",
    "OnnxRuntimeRunner",
    "Runner",
    "artifact_precision",
    "available_providers",
    "onnxruntime_device",
    "open_runner",
    "precision_from_filename",
    "providers_for_device",
    "run_relative_path",
    "select_artifact",
]

DEVICES = ("cpu", "cuda")


def artifact_precision(relpath: str, entry: ArtifactEntry) -> str:
    """An artifact's precision: the manifest entry's, else what its file name says."""
    precision = entry.get("precision")
    return precision if isinstance(precision, str) and precision else precision_from_filename(relpath)


def select_artifact(run_dir: str | os.PathLike[str], manifest: Manifest, backend: str, precision: str) -> str:
    """Return the run-relative path of the file that serves `backend` ("onnxruntime", "tensorrt")
    at `precision`: a precision ("int8"), or the label of one file ("int8-trt"), as the format keys
    of validate, bench and report name them (deploy.formats.format_keys).

    Several files may share a precision (export writes two int8 ONNX flavours, and a uint8-input
    fp32 variant); the one under export's standard name (deploy.formats.standard_file) wins.
    UsageError if none matches, listing the formats the run has and saying how to make the file,
    or if the choice is still ambiguous.
    """
    if backend not in KIND_OF_BACKEND:
        raise UsageError(f"backend {backend!r}: run files exist for {', '.join(KIND_OF_BACKEND)} only")
    kind = KIND_OF_BACKEND[backend]
    keys = format_keys(manifest.get("artifacts", {}))
    runnable = set(keys.values())
    files = {rel: entry for rel, entry in artifacts_of_kind(manifest, kind).items() if rel in runnable}
    matches = sorted(rel for rel, entry in files.items() if artifact_precision(rel, entry) == precision)
    canonical = standard_file(kind, precision)
    if canonical in matches:
        return canonical
    if len(matches) == 1:
        return matches[0]
    requested = f"{backend}/{precision}"
    if not matches and requested in keys:
        return keys[requested]
    if not matches:
        raise UsageError(
            f"{run_dir}: no {requested} file in the manifest (has: {', '.join(keys) or 'none'});"
            f" make it with {export_advice(run_dir, requested)}"
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


def onnxruntime_device(device: str) -> str:
    """ONNX Runtime's device for "auto": the GPU where onnxruntime-gpu's CUDA provider and a GPU are both
    here (onnxruntime-gpu lists its providers even on machines without a GPU or driver)."""
    if device != "auto":
        return device
    return "cuda" if CUDA_PROVIDER in available_providers() and current_gpu() is not None else "cpu"


def open_runner(
    path: str | os.PathLike[str],
    *,
    manifest: Manifest | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> Runner:
    """Open a deployable file with the backend its suffix names (.onnx, .plan/.engine).

    With a manifest and its run directory, the file must lie inside the run and its sha256 must
    match the manifest's (checked first), and the precision and input shape come from the
    manifest. An ONNX file must then also agree with the manifest: its output width is the
    manifest's class count, and the manifest it carries has the run's classes and input block.
    `device` ("cpu" or "cuda") picks ONNX Runtime's execution providers; a TensorRT plan always
    runs on its GPU. `threads` sets ONNX Runtime's intra-op threads.
    """
    if (manifest is None) != (run_dir is None):
        raise UsageError("open_runner: pass the manifest and its run directory together")
    if device not in DEVICES:
        raise UsageError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    file = Path(path)
    precision: str | None = None
    input_shape: tuple[int, int, int] | None = None
    if manifest is not None and run_dir is not None:
        relpath = run_relative_path(file, run_dir, manifest)
        file = verify_artifact(run_dir, manifest, relpath)
        precision = manifest["artifacts"][relpath].get("precision")
        if manifest.get("input"):
            input_shape = input_spec(manifest).shape
    kind = kind_of_file(file)
    if kind == "onnx":
        runner = OnnxRuntimeRunner(
            file,
            providers=providers_for_device(device),
            threads=threads,
            precision=precision,
            input_shape=input_shape,
        )
        if manifest is not None:
            try:
                check_output_width(manifest, runner.output_width, str(file))
                embedded = runner.embedded_manifest()
                if embedded is not None:
                    check_manifests_agree(manifest, embedded, str(file))
            except UsageError:
                runner.close()
                raise
        return runner
    if kind == "tensorrt":
        with optional_import("a TensorRT engine"):
            from deploy.runners.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(file)
    raise UsageError(
        f"{file}: unknown model file type {file.suffix or '(none)'!r}; expected .onnx, .plan or .engine"
        " (PyTorch weights are run through the reviewkd commands, which build the model)"
    )
