"""`reviewkd predict` and `reviewkd triton`: use a run's deployable files.

predict TARGET IMAGE...  TARGET is a run directory (its fp32 ONNX file by default, or the file
                         --backend names), or a model file: an .onnx or .plan inside a run (checked
                         against that run's manifest), or a stand-alone .onnx carrying its manifest
                         in its metadata.
triton RUN --out REPO    a Triton model repository for the run's ONNX file and TensorRT plans.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deploy.errors import UsageError
from deploy.fileio import verify_onnx_content
from deploy.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_artifact
from deploy.predict import Prediction, check_export_is_current, predict
from deploy.runners import ARTIFACT_KINDS, OnnxRuntimeRunner, Runner, open_runner, select_artifact
from deploy.triton import DEFAULT_MAX_BATCH_SIZE, INSTANCE_KINDS, write_triton_repository

DEFAULT_BACKEND = "onnxruntime/fp32"
# How many folders above a model file to look for the run it belongs to (RUN/export/FILE).
_RUN_SEARCH_DEPTH = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the predict and triton subcommands."""
    predict_parser = subparsers.add_parser(
        "predict",
        help="classify image files with a run or a model file",
        description="Print the top-k classes of each image, preprocessed as the run's manifest says.",
    )
    predict_parser.add_argument("target", type=Path, metavar="RUN|MODEL", help="run directory or .onnx/.plan")
    predict_parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    predict_parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    predict_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict_parser.add_argument(
        "--backend",
        default=None,
        metavar="BACKEND/PRECISION",
        help=f"which of a run's formats to use, e.g. onnxruntime/int8, tensorrt/fp16, torch/fp32"
        f" (default {DEFAULT_BACKEND}); not for a model file, whose suffix decides",
    )
    predict_parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    predict_parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    predict_parser.set_defaults(handler=run_predict)

    triton_parser = subparsers.add_parser(
        "triton",
        help="write a Triton Inference Server model repository",
        description="Write one Triton model per deployable file of the run (ONNX, TensorRT plans).",
    )
    triton_parser.add_argument("run", type=Path, metavar="RUN", help="run directory")
    triton_parser.add_argument("--out", type=Path, required=True, metavar="REPO", help="model repository")
    triton_parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help=f"ONNX: default {DEFAULT_MAX_BATCH_SIZE}; plans: the engine profile's maximum, capped by this",
    )
    triton_parser.add_argument(
        "--instance-kind",
        choices=tuple(INSTANCE_KINDS),
        default="cpu",
        help="ONNX model instances (default cpu)",
    )
    triton_parser.add_argument("--count", type=int, default=1, help="instances per model (default 1)")
    triton_parser.add_argument("--name", default=None, help="model name prefix (default: the student's arch)")
    triton_parser.set_defaults(handler=run_triton)


def _parse_backend(key: str) -> tuple[str, str]:
    backend, _, precision = key.partition("/")
    if backend not in (*ARTIFACT_KINDS, "torch") or not precision:
        raise UsageError(
            f"--backend {key!r}: expected <backend>/<precision> with backend onnxruntime, tensorrt or torch"
        )
    return backend, precision


def _torch_runner(run: Path, manifest: Manifest, precision: str, device: str) -> Runner:
    """Build the run's student with the model zoo and load its hash-checked weights."""
    from deploy.runners.torch_runner import TorchRunner
    from reviewkd.models import create_model, load_weights

    weights = verify_artifact(run, manifest, "student.safetensors")
    student = manifest.get("student", {})
    model = create_model(student["arch"], student.get("num_classes") or len(manifest["classes"]))
    load_weights(model, weights)
    shape = manifest["input"]["shape"]
    return TorchRunner(model, (shape[0], shape[1], shape[2]), device=device, precision=precision)


def _enclosing_run(model_file: Path) -> tuple[Path, Manifest] | None:
    """The run directory whose manifest lists `model_file`, looking a few folders up."""
    resolved = model_file.resolve()
    for parent in list(resolved.parents)[:_RUN_SEARCH_DEPTH]:
        if (parent / MANIFEST_NAME).is_file():
            manifest = read_manifest(parent)
            if resolved.relative_to(parent).as_posix() in manifest.get("artifacts", {}):
                return parent, manifest
    return None


def open_target(
    target: Path, backend: str | None, device: str, threads: int | None
) -> tuple[Runner, Manifest]:
    """Open what `reviewkd predict` was pointed at; return the runner and the manifest to read."""
    if target.is_dir():
        manifest = read_manifest(target)
        name, precision = _parse_backend(backend or DEFAULT_BACKEND)
        if name == "torch":
            return _torch_runner(target, manifest, precision, device), manifest
        relpath = select_artifact(target, manifest, name, precision)
        check_export_is_current(target, manifest, relpath)
        return open_runner(
            relpath, manifest=manifest, run_dir=target, device=device, threads=threads
        ), manifest
    if not target.is_file():
        raise UsageError(f"{target}: no such run directory or model file")
    if backend is not None:
        raise UsageError(
            "--backend picks a file of a run directory; a model file's suffix decides its backend"
        )
    found = _enclosing_run(target)
    if found is not None:
        run, manifest = found
        check_export_is_current(run, manifest, target.resolve().relative_to(run).as_posix())
        return open_runner(target, manifest=manifest, run_dir=run, device=device, threads=threads), manifest
    if target.suffix.lower() == ".onnx":
        verify_onnx_content(target)
    runner = open_runner(target, device=device, threads=threads)
    embedded = runner.embedded_manifest() if isinstance(runner, OnnxRuntimeRunner) else None
    if embedded is None:
        runner.close()
        raise UsageError(
            f"{target}: no run manifest lists it and it carries none in its metadata;"
            " keep it in its run directory (RUN/export/) or pass the run directory"
        )
    return runner, embedded


def _table(paths: list[Path], results: list[Prediction], runner_name: str) -> str:
    rows = [("IMAGE", "#", "CLASS", "PROBABILITY")]
    for path, top in zip(paths, results, strict=True):
        for rank, (name, probability) in enumerate(top, start=1):
            rows.append((str(path) if rank == 1 else "", str(rank), name, f"{probability:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}".rstrip()
        for row in rows
    ]
    return "\n".join([f"runner: {runner_name}", *lines])


def run_predict(args: argparse.Namespace) -> int:
    """Handler of `reviewkd predict`."""
    runner, manifest = open_target(args.target, args.backend, args.device, args.threads)
    with runner:
        results = predict(runner, manifest, args.images, top_k=args.top_k)
        name = runner.name
    if args.json:
        document: dict[str, Any] = {
            "target": str(args.target),
            "runner": name,
            "predictions": [
                {"image": str(path), "top_k": [{"class": c, "probability": p} for c, p in top]}
                for path, top in zip(args.images, results, strict=True)
            ],
        }
        print(json.dumps(document, indent=2))
    else:
        print(_table(args.images, results, name))
    return 0


def run_triton(args: argparse.Namespace) -> int:
    """Handler of `reviewkd triton`."""
    models = write_triton_repository(
        args.run,
        args.out,
        max_batch_size=args.max_batch_size,
        instance_kind=args.instance_kind,
        instance_count=args.count,
        model_name=args.name,
    )
    for model in models:
        print(
            f"{args.out / model.name}: {model.platform} from {model.source},"
            f" max_batch_size {model.max_batch_size}, {model.instance_count} x {model.instance_kind}"
        )
    return 0
