"""`reviewkd predict`: classify image files, or detect objects in them, with a run or one of its
model files.

predict TARGET IMAGE...  TARGET is a run directory (its fp32 ONNX file by default, or the file
                         --backend names), or a model file: an .onnx or .plan inside a run (checked
                         against that run's manifest), or a stand-alone .onnx carrying its manifest
                         in its metadata.

The path: this module parses, deploy.predict opens the target, the task's predictor
(deploy.task_serving, by the manifest's task) runs it through a deploy.runners runner and renders
the results; this module prints. A classifier prints each image's top-k classes; a detector each
image's boxes in the image's own pixels, drawn onto copies with --save-dir. An image that cannot be
read gets its error in its place and the others are still run; the command then exits 2. File and
class names are printed escaped (deploy.errors.printable): a name cannot forge a row of the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deploy.errors import UsageError, printable
from deploy.manifest import Manifest
from deploy.predict import DEFAULT_BACKEND, open_target
from deploy.runners.base import Runner
from deploy.task_serving import serving_of
from deploy.tasks import task_of
from reviewkd.student import open_student_runner


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the predict subcommand."""
    predict_parser = subparsers.add_parser(
        "predict",
        help="classify image files, or detect objects in them, with a run or a model file",
        description="Print the top-k classes of each image (classification) or its boxes, classes and"
        " scores (detection), preprocessed as the run's manifest says.",
    )
    predict_parser.add_argument("target", type=Path, metavar="RUN|MODEL", help="run directory or .onnx/.plan")
    predict_parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    predict_parser.add_argument(
        "--top-k", type=int, default=5, help="classification: classes to show per image (default 5)"
    )
    predict_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict_parser.add_argument(
        "--save-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="detection: write each image with its boxes, class names and scores drawn, as DIR/<name>.png",
    )
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


def _open_student(run: Path, manifest: Manifest, precision: str, device: str) -> Runner:
    """The run's PyTorch student for `--backend torch/<precision>`, where its task's serving runs it
    in-process (deploy.task_serving); a one-line UsageError naming the run otherwise."""
    if not serving_of(manifest, str(run)).student_in_process:
        raise UsageError(
            f"--backend torch/{precision}: {run} is a {task_of(manifest).name} run, whose predictions come"
            f" from its exported files only; use --backend {DEFAULT_BACKEND} (or another of its files)"
        )
    return open_student_runner(run, manifest, precision, device)


def run_predict(args: argparse.Namespace) -> int:
    """Handler of `reviewkd predict`: the task the manifest records decides what is run and shown."""
    runner, manifest = open_target(
        args.target, args.backend, device=args.device, threads=args.threads, open_module=_open_student
    )
    with runner:
        predictor = serving_of(manifest, str(args.target)).predictor
        results = predictor.predict_each(runner, manifest, args.images, args.top_k)
        name = runner.name
    failed = [result for result in results if isinstance(result, UsageError)]
    if len(failed) == len(results):  # nothing to show but the error
        raise failed[0] if len(failed) == 1 else _some_failed(failed, len(results))
    drawn = predictor.draw(args.images, results, args.save_dir) if args.save_dir is not None else []
    if args.json:
        document: dict[str, Any] = {
            "target": str(args.target),
            "runner": name,
            "predictions": [
                {"image": str(path), "error": str(result)}
                if isinstance(result, UsageError)
                else {"image": str(path), **predictor.as_json(result)}
                for path, result in zip(args.images, results, strict=True)
            ],
        }
        if args.save_dir is not None:
            document["drawn"] = [str(path) for path in drawn]
        print(json.dumps(document, indent=2))
    else:
        print(f"runner: {name}")
        print(predictor.table(args.images, results))
        for path in drawn:
            print(f"drawn: {printable(str(path))}")
    if failed:
        raise _some_failed(failed, len(results))
    return 0


def _some_failed(failed: list[UsageError], total: int) -> UsageError:
    """The one-line error for images that could not be classified, naming the first."""
    others = " (the others were)" if len(failed) < total else ""
    return UsageError(f"{len(failed)} of {total} images could not be read{others}; first: {failed[0]}")
