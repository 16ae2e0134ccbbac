"""Validate, bench and report a run directory: the formats of a run and the stages over them.

`run_targets` lists a run's formats (the PyTorch student, then each model file of the manifest);
`validate_run`, `bench_run` and `report_run` measure them and save RUN/report/*.json. The
`reviewkd validate|bench|report` commands and the `reviewkd run` pipeline call these.

Without torch (the edge install), or in a run without student weights (a folder of exported files),
the student cannot run: parity is measured against the fp32 ONNX file instead, which validate.json
records ("reference", "reference_note") and the command prints.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.environment import collect_environment, machine_text
from benchmarks.images import folder_batches, run_validation_folder
from benchmarks.latency import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_WARMUP,
    benchmark_runners,
    compare_targets,
    compared_pair,
)
from benchmarks.measured import SOURCE_FOLDER, SOURCE_RUN_SPLIT, manifest_student_sha256
from benchmarks.report import saved_with_notes, write_report
from benchmarks.targets import Target, artifact_formats
from benchmarks.validate import REFERENCE_KEY, validate_runners
from deploy import run_layout
from deploy.errors import MissingDependencyError, UsageError
from deploy.gates import GateTable
from deploy.gpu import current_gpu
from deploy.manifest import Manifest, read_manifest
from deploy.optional import installed, optional_import
from deploy.predict import check_export_is_current
from deploy.run_lock import locks_run
from deploy.runners import onnxruntime_device, open_runner
from deploy.runners.base import Runner
from reviewkd.config import load_run_config
from reviewkd.student import open_student_runner

PathLike = str | os.PathLike[str]
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_VALIDATE_BATCH = 64
# The reference where the student cannot run: the fp32 ONNX file, checked against it at export.
ONNX_REFERENCE_KEY = "onnxruntime/fp32"


def resolve_device(device: str) -> str:
    """Return "cpu" or "cuda" for a --device value; "cuda" without a GPU is MissingDependencyError.

    Where torch is installed its view decides (the student runs on it); elsewhere the GPU probe.
    """
    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if installed("torch"):
        with optional_import("the PyTorch reference"):
            import torch

        has_gpu = bool(torch.cuda.is_available())
        where = f"torch {torch.__version__} sees no CUDA GPU"
    else:
        has_gpu = current_gpu() is not None
        where = "no NVIDIA GPU was found"
    if device == "cuda" and not has_gpu:
        raise MissingDependencyError(
            f"--device cuda: {where}; run on a machine with an NVIDIA GPU, or use --device cpu"
        )
    if device == "auto":
        return "cuda" if has_gpu else "cpu"
    return device


def _open_student(run: Path, manifest: Manifest, precision: str, device: str) -> Runner:
    return open_student_runner(run, manifest, precision, device)


def _open_file(run: Path, manifest: Manifest, relpath: str, device: str, threads: int | None) -> Runner:
    # A file exported from an earlier student is refused here as predict and triton refuse it:
    # its numbers would otherwise stand for the current student's.
    check_export_is_current(run, manifest, relpath)
    return open_runner(relpath, manifest=manifest, run_dir=run, device=device, threads=threads)


def _selected(key: str, backends: Sequence[str] | None) -> bool:
    return backends is None or any(key == b or key.split("/", 1)[0] == b for b in backends)


def has_student(run: Path, manifest: Manifest) -> bool:
    """Whether the run holds its student's weights (listed in the manifest, or at least on disk)."""
    return run_layout.STUDENT_WEIGHTS in manifest.get("artifacts", {}) or (
        run_layout.run_path(run, run_layout.STUDENT_WEIGHTS).is_file()
    )


def choose_reference(run: Path, manifest: Manifest) -> tuple[str, str | None]:
    """The format every other is compared with, and a note when it is not the PyTorch student.

    The student (torch/fp32) where torch is installed and the run has its weights; else the fp32
    ONNX file, which export checked against the student.
    """
    if not installed("torch"):
        why = "torch is not installed here"
    elif not has_student(run, manifest):
        why = f"the run has no {run_layout.STUDENT_WEIGHTS}"
    else:
        return REFERENCE_KEY, None
    return ONNX_REFERENCE_KEY, (
        f"{why}: parity is measured against the fp32 ONNX file on the CPU ({ONNX_REFERENCE_KEY}),"
        " which export checked against the PyTorch student"
    )


def run_targets(
    run_dir: PathLike,
    *,
    device: str = "auto",
    threads: int | None = None,
    backends: Sequence[str] | None = None,
    with_reference: bool = False,
) -> list[Target]:
    """Return the formats of a run: torch/fp32 and torch/fp16 (the student, where the run has its
    weights), then each model file.

    backends: keep only these keys ("onnxruntime/int8") or backends ("onnxruntime"); None keeps
        all. `with_reference` keeps the reference (`choose_reference`) whatever the filter.
    Files whose input is not float NCHW (export's uint8-input variant) are left out (see
    `benchmarks.targets.artifact_formats`). Nothing is opened here; each target's opener verifies
    its file's sha256 against the manifest, and that it was exported from the run's current
    student (`deploy.predict.check_export_is_current`), when called.
    """
    run = Path(run_dir)
    manifest = read_manifest(run)
    resolved = resolve_device(device)
    ort_device = onnxruntime_device("auto" if device == "auto" else resolved)
    reference = choose_reference(run, manifest)[0] if with_reference else None
    weights = manifest.get("artifacts", {}).get(run_layout.STUDENT_WEIGHTS)
    weights_file = run_layout.run_path(run, run_layout.STUDENT_WEIGHTS)
    weights_size = weights["size_bytes"] if weights else None
    if weights_size is None and weights_file.is_file():
        weights_size = weights_file.stat().st_size
    targets: list[Target] = []
    student_formats = ["torch/fp32", "torch/fp16"] if has_student(run, manifest) else []
    for key in student_formats:
        precision = key.split("/", 1)[1]
        if _selected(key, backends) or key == reference:
            targets.append(
                Target(
                    key,
                    precision,
                    functools.partial(_open_student, run, manifest, precision, resolved),
                    file=run_layout.STUDENT_WEIGHTS,
                    size_bytes=weights_size,
                    sha256=weights["sha256"] if weights else None,
                )
            )
    for key, (relpath, entry) in artifact_formats(manifest).items():
        if not _selected(key, backends) and key != reference:
            continue
        backend_device = ort_device if key.startswith("onnxruntime/") else resolved
        if key == reference == ONNX_REFERENCE_KEY:
            # The stand-in reference runs where it is exact and always available: ONNX Runtime's CPU
            # provider (a Jetson has no onnxruntime-gpu wheel on PyPI).
            backend_device = "cpu"
        targets.append(
            Target(
                key,
                str(entry.get("precision") or "fp32"),
                functools.partial(_open_file, run, manifest, relpath, backend_device, threads),
                file=relpath,
                size_bytes=entry["size_bytes"],
                sha256=entry["sha256"],
            )
        )
    if backends is not None:
        known = [*student_formats, *artifact_formats(manifest)]
        unknown = [b for b in backends if not any(_selected(k, [b]) for k in known)]
        if unknown:
            raise UsageError(f"--backends {','.join(unknown)}: not in this run; it has {', '.join(known)}")
    return targets


def parse_backends(text: str | None) -> list[str] | None:
    """Parse --backends "onnxruntime,torch/fp32" into a list; None or "all" keeps every format."""
    if text is None or text.strip() in ("", "all"):
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _apply_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if installed("torch"):
        with optional_import("the PyTorch reference"):
            import torch

        # The torch student runs in this process: its intra-op pool gets the same budget as ONNX Runtime.
        torch.set_num_threads(threads)


def validation_batches(
    run_dir: PathLike, batch_size: int, limit: int | None, data: PathLike | None = None
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """The validation images of a run: `data` (an image folder per class) when given, else the run's
    own held-out split (read with torch where installed, else from its ImageFolder tree): its test
    split when data.val_split carved the split training selected on, so the score is on unseen images."""
    run = Path(run_dir)
    if data is not None:
        return folder_batches(Path(data), read_manifest(run), batch_size, limit)
    if installed("torch"):
        with optional_import("the PyTorch reference"):
            from reviewkd.data import iter_run_batches

        return iter_run_batches(run, "test", batch_size, limit)
    return folder_batches(run_validation_folder(run), read_manifest(run), batch_size, limit)


def validation_source(run_dir: PathLike, limit: int | None, data: PathLike | None) -> dict[str, Any]:
    """What `validation_batches` reads, for the result's "measured" block (benchmarks.measured):
    the --data folder by its absolute path, else the run's own split named by RUN/config.yaml."""
    if data is not None:
        return {"kind": SOURCE_FOLDER, "path": str(Path(data).resolve()), "limit": limit}

    config = load_run_config(run_dir).data
    root = str(Path(config.root).resolve()) if config.root else None
    return {"kind": SOURCE_RUN_SPLIT, "dataset": config.dataset, "path": root, "limit": limit}


@locks_run("validate")
def validate_run(
    run_dir: PathLike,
    *,
    backends: Sequence[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int = DEFAULT_VALIDATE_BATCH,
    limit: int | None = None,
    gates: GateTable | None = None,
    data: PathLike | None = None,
    batches: Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
    inconclusive_passes: bool = True,
) -> dict[str, Any]:
    """Validate every format of a run and save RUN/report/validate.json; return its content.

    inconclusive_passes: whether a top-1 drop gate the images cannot resolve passes (see deploy.gates).

    data: a folder of validation images, one sub-folder per class; batches: the images themselves;
    both None read the run's validation split (`validation_batches`). Does not raise on a failed
    gate: the caller decides (`benchmarks.validate.raise_for_gates(result)`).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    _apply_threads(threads)
    targets = run_targets(run_dir, device=device, threads=threads, backends=backends, with_reference=True)
    source = None
    if batches is None:
        batches = validation_batches(run_dir, batch_size, limit, data)
        source = validation_source(run_dir, limit, data)
    manifest = read_manifest(run_dir)
    reference, note = choose_reference(Path(run_dir), manifest)
    result = validate_runners(
        targets,
        batches,
        reference=reference,
        gates=gates,
        inconclusive_passes=inconclusive_passes,
        source=source,
        student_sha256=manifest_student_sha256(manifest),
    )
    if note is not None:
        result["reference_note"] = note
    result["settings"] = {
        "device": device,
        "threads": threads,
        "batch_size": batch_size,
        "limit": limit,
        "data": None if data is None else str(Path(data).resolve()),
    }
    result["environment"] = collect_environment(threads)
    return saved_with_notes(run_dir, run_layout.VALIDATE_FILE, result)


@locks_run("bench")
def bench_run(
    run_dir: PathLike,
    *,
    backends: Sequence[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup: int = DEFAULT_WARMUP,
    iters: int | None = None,
    seconds: float | None = None,
    cuda_graphs: bool = True,
    compare: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Time every format of a run and save RUN/report/bench.json; return its content.

    compare: two format keys (A, B): time only those two, interleaved, and record the ratio of
    their medians under "comparisons" ("A,B"), beside the formats benched earlier
    (benchmarks.latency.compare_targets); A = B opens the file twice (an A/A check). A key the run
    does not have is a UsageError.
    """
    _apply_threads(threads)
    if compare is not None and backends is not None:
        raise UsageError("give either --compare or --backends, not both (--compare names its two formats)")
    if compare is not None:
        targets = {t.key: t for t in run_targets(run_dir, device=device, threads=threads)}
        compared = compared_pair(targets, compare, run_dir)
        picked: list[Target] = []
    else:
        picked = run_targets(run_dir, device=device, threads=threads, backends=backends)
    result = benchmark_runners(
        picked,
        batch_sizes=batch_sizes,
        warmup=warmup,
        iters=iters,
        seconds=seconds,
        threads=threads,
        cuda_graphs=cuda_graphs,
        student_sha256=manifest_student_sha256(read_manifest(run_dir)),
    )
    result["settings"]["device"] = device
    if compare is not None:
        result["comparisons"] = {
            ",".join(compare): compare_targets(
                *compared,
                result["settings"]["batch_sizes"],
                warmup=warmup,
                iters=iters,
                seconds=seconds,
            )
        }
        for comparison in result["comparisons"].values():
            # Named like each format's entry, so that comparisons from two machines stay told apart.
            comparison["machine"] = machine_text(result["environment"])
    return saved_with_notes(run_dir, run_layout.BENCH_FILE, result)


@locks_run("report")
def report_run(run_dir: PathLike) -> dict[str, Any]:
    """Write RUN/report/report.json, report.md, report.html and the plots; return the report."""
    return write_report(run_dir)
