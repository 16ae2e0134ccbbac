"""`reviewkd predict`: classify image files with a run or one of its model files.

predict TARGET IMAGE...  TARGET is a run directory (its fp32 ONNX file by default, or the file
                         --backend names), or a model file: an .onnx or .plan inside a run (checked
                         against that run's manifest), or a stand-alone .onnx carrying its manifest
                         in its metadata.

The path: this module parses, deploy.predict opens the target and classifies, a deploy.runners
runner infers; this module prints. An image that cannot be read gets its error in its place and
the others are still classified; the command then exits 2. File and class names are printed
escaped (deploy.errors.printable): a name cannot forge a row of the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deploy.errors import UsageError, printable
from deploy.predict import DEFAULT_BACKEND, Prediction, open_target, predict_each
from deploy.tasks import require_deployable_run
from reviewkd.student import open_student_runner


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the predict subcommand."""
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


def _table(paths: list[Path], results: list[Prediction | UsageError], runner_name: str) -> str:
    rows = [("IMAGE", "#", "CLASS", "PROBABILITY")]
    for path, top in zip(paths, results, strict=True):
        if isinstance(top, UsageError):
            rows.append((printable(str(path)), "-", printable(f"error: {top}"), ""))
            continue
        for rank, (name, probability) in enumerate(top, start=1):
            shown = printable(str(path)) if rank == 1 else ""
            rows.append((shown, str(rank), printable(name), f"{probability:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}".rstrip()
        for row in rows
    ]
    return "\n".join([f"runner: {runner_name}", *lines])


def run_predict(args: argparse.Namespace) -> int:
    """Handler of `reviewkd predict`."""
    require_deployable_run(args.target, "predict")
    runner, manifest = open_target(
        args.target, args.backend, device=args.device, threads=args.threads, open_module=open_student_runner
    )
    with runner:
        results = predict_each(runner, manifest, args.images, top_k=args.top_k)
        name = runner.name
    failed = [result for result in results if isinstance(result, UsageError)]
    if len(failed) == len(results):  # nothing to show but the error
        raise failed[0] if len(failed) == 1 else _some_failed(failed, len(results))
    if args.json:
        document: dict[str, Any] = {
            "target": str(args.target),
            "runner": name,
            "predictions": [
                {"image": str(path), "error": str(top)}
                if isinstance(top, UsageError)
                else {"image": str(path), "top_k": [{"class": c, "probability": p} for c, p in top]}
                for path, top in zip(args.images, results, strict=True)
            ],
        }
        print(json.dumps(document, indent=2))
    else:
        print(_table(args.images, results, name))
    if failed:
        raise _some_failed(failed, len(results))
    return 0


def _some_failed(failed: list[UsageError], total: int) -> UsageError:
    """The one-line error for images that could not be classified, naming the first."""
    others = " (the others were)" if len(failed) < total else ""
    return UsageError(f"{len(failed)} of {total} images could not be classified{others}; first: {failed[0]}")
