"""`reviewkd triton RUN --out REPO`: a Triton model repository for the run's ONNX files and TensorRT plans."""

from __future__ import annotations

import argparse
from pathlib import Path

from deploy.manifest import read_manifest
from deploy.triton import DEFAULT_MAX_BATCH_SIZE, INSTANCE_KINDS, onnx_files_left_out, write_triton_repository


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the triton subcommand."""
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


def run_triton(args: argparse.Namespace) -> int:
    """Handler of `reviewkd triton`."""
    manifest = read_manifest(args.run)
    models = write_triton_repository(
        args.run,
        args.out,
        manifest=manifest,
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
    for relpath, reason in onnx_files_left_out(manifest).items():
        print(f"{relpath}: not served: {reason}")
    return 0
