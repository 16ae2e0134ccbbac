"""`reviewkd quantize`: quantization-aware ReviewKD (QAD) of a run's student, then its Q/DQ ONNX files.

quantize RUN --epochs N [--teacher FILE] [--lr LR] [--kd-weight W] [--calib-samples N] [--check-samples N]
    [--device D] [--resume]
    fine-tunes RUN's student under int8 fake quantization against the run's teacher (reviewkd.qad:
    RUN/teacher/teacher.safetensors, or --teacher for a run distilled with a teacher from outside it)
    into RUN/qad/, then writes export/student.int8.qad.trt.onnx (TensorRT) and
    export/student.int8.qad.onnx (ONNX Runtime), checks them and records them in RUN/manifest.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deploy.errors import UsageError
from deploy.optional import optional_import
from deploy.tasks import require_deployable_run
from reviewkd.config import DEVICES


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the quantize subcommand."""
    parser = subparsers.add_parser(
        "quantize",
        help="quantization-aware ReviewKD: fine-tune a run's student under int8 fake quantization",
        description="Fine-tune RUN's distilled student under int8 fake quantization (TensorRT placement), "
        "supervised by the teacher with HCL on the ABF-reviewed features and KD on the logits, "
        "then export and check its Q/DQ ONNX files.",
    )
    parser.add_argument("run", type=Path, metavar="RUN", help="a run directory written by reviewkd distill")
    parser.add_argument("--epochs", type=int, required=True, metavar="N", help="fine-tuning epochs")
    parser.add_argument(
        "--teacher",
        type=Path,
        metavar="FILE",
        help="the weights the run was distilled with, checked by the manifest's sha256 (default:"
        " RUN/teacher/teacher.safetensors; the path the manifest records is never read)",
    )
    parser.add_argument(
        "--lr", type=float, metavar="LR", help="peak learning rate (default: 0.001 x the run's)"
    )
    parser.add_argument(
        "--kd-weight",
        type=float,
        metavar="W",
        help="weight of KD on the logits, 0 for HCL and cross-entropy alone (default: the run's "
        "method.kd_weight)",
    )
    parser.add_argument(
        "--calib-samples", type=int, default=512, metavar="N", help="training images the ranges start from"
    )
    parser.add_argument(
        "--check-samples",
        type=int,
        default=10_000,
        metavar="N",
        help="validation images the checks run on (default 10000, as export's)",
    )
    parser.add_argument("--device", choices=DEVICES, help="override train.device (default: the run's)")
    parser.add_argument("--resume", action="store_true", help="continue RUN/qad from its checkpoint")
    parser.set_defaults(handler=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    """Handler of `reviewkd quantize`."""
    with optional_import("reviewkd quantize"):
        from export.qad_export import export_qad
        from reviewkd.qad import quantize_run

    require_deployable_run(args.run, "quantize")
    if args.check_samples < 1:  # export's own check would come only after the fine-tuning
        raise UsageError(f"--check-samples must be >= 1, got {args.check_samples}")
    result = quantize_run(
        args.run,
        args.epochs,
        lr=args.lr,
        calib_samples=args.calib_samples,
        resume=args.resume,
        device=args.device,
        kd_weight=args.kd_weight,
        teacher_file=args.teacher,
    )
    print(
        f"qad: fake-quant val top1 {result.calibrated_top1:.2f}% calibrated, {result.top1:.2f}% fine-tuned "
        f"(best epoch {result.epoch}); exporting {result.weights}"
    )
    summary = export_qad(args.run, check_samples=args.check_samples, log=print)
    summary.raise_for_status()
    return 0
