"""`reviewkd export`: a run's student (or a zoo model trained elsewhere) to ONNX flavours and TensorRT.

export RUN [--formats ...]                       export a training run
export --model NAME --weights FILE --input-shape C,H,W --out DIR [--data IMAGEFOLDER]
                                                 export a plain zoo model into a run-like DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from deploy.errors import UsageError
from deploy.formats import EXPORT_FORMAT_NAMES, ONNX_FORMATS
from deploy.tasks import require_deployable_run
from export.check import CHECK_DEVICES
from export.pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TensorRTOptions,
    export_model,
    export_run,
    parse_formats,
)


def _three_ints(text: str, spelled: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected {spelled} with positive integers, got {text!r}")
    return (parts[0], parts[1], parts[2])


def _shape(text: str) -> tuple[int, int, int]:
    return _three_ints(text, "C,H,W")


def _profile(text: str) -> tuple[int, int, int]:
    return _three_ints(text, "MIN,OPT,MAX")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the export subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export a run's student to ONNX (fp32, fp16, int8) and TensorRT, checked against PyTorch",
        description=(
            "Write RUN/export/student.onnx (fp32), student.fp16.onnx, student.int8.onnx (fastest int8 on "
            "ONNX Runtime CPUs), student.int8.trt.onnx (symmetric Q/DQ for TensorRT) and, with "
            "--formats tensorrt, TensorRT engines; each file is checked against the PyTorch student on "
            "the run's validation images and recorded in the manifest. Exit 1 if a file fails its check "
            "(it is kept as FILE.failed), 3 if TensorRT was asked for and is missing. --formats tensorrt "
            "alone builds engines from the run's checked ONNX files and needs no PyTorch (the edge install)."
        ),
    )
    parser.add_argument("run", nargs="?", type=Path, metavar="RUN", help="the run directory to export")
    parser.add_argument(
        "--formats",
        help=f"comma-separated subset of {','.join(EXPORT_FORMAT_NAMES)} that the run's task exports"
        f" (default: {','.join(ONNX_FORMATS)} for a classifier, with efficientnms for a detector, plus"
        " tensorrt where TensorRT and a GPU are available)",
    )
    parser.add_argument(
        "--calib-samples", type=int, help="int8 calibration images (default 512; 256 for a detector)"
    )
    parser.add_argument(
        "--calib-method",
        default="auto",
        help="int8 calibration: minmax, entropy, percentile, or auto (default: each, the best on held-out "
        "training images kept)",
    )
    parser.add_argument(
        "--max-top1-drop-int8",
        type=float,
        default=0.3,
        help="top-1 points int8 may lose against fp32: its most sensitive layers stay in float until the"
        " paired 95%% interval of the drop on held-out training images (up to 10,000, as many as it"
        " takes) lies within it (default 0.3; a negative value quantizes every layer)",
    )
    parser.add_argument(
        "--check-samples",
        type=int,
        default=10_000,
        help="validation images to check on (default 10000: the whole split of CIFAR-size data; the int8"
        " gate judges its paired interval on them, and stops at 1/8, 1/4 or 1/2 of them once resolved)",
    )
    parser.add_argument(
        "--check-device",
        choices=CHECK_DEVICES,
        default="auto",
        help="where the PyTorch reference and the files' checks, scores and searches compute: cuda"
        " (fp32, TF32 off; the ONNX Runtime CPU int8 file still runs on the CPU, where it is deployed;"
        " exit 3 if PyTorch or onnxruntime-gpu cannot use the GPU), cpu, or auto (default: each on"
        " the GPU where it can run there; the manifest records where)",
    )
    parser.add_argument(
        "--bake-preprocessing", action="store_true", help="also write student.uint8.onnx (uint8 NHWC input)"
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    trt = parser.add_argument_group("TensorRT")
    trt.add_argument(
        "--trt-batch", type=_profile, default=(1, 8, 32), metavar="MIN,OPT,MAX", help="batch profile"
    )
    trt.add_argument("--trt-workspace-mib", type=int, default=1024, help="builder workspace limit")
    trt.add_argument("--trt-opt-level", type=int, default=3, help="builder optimisation level 0..5")
    trt.add_argument(
        "--trt-compat", choices=("version", "hardware"), help="version or hardware compatibility"
    )
    trt.add_argument(
        "--dla-core",
        type=int,
        metavar="N",
        help="build the fp16 and int8 engines for DLA core N of a Jetson (layers the DLA cannot run fall "
        "back to the GPU)",
    )
    trt.add_argument(
        "--no-gpu-fallback",
        dest="gpu_fallback",
        action="store_false",
        help="with --dla-core: fail the build instead of running layers the DLA cannot run on the GPU",
    )
    plain = parser.add_argument_group("a zoo model trained elsewhere (instead of RUN)")
    plain.add_argument(
        "--model", help="zoo model name (reviewkd.models.list_models(), torchvision:NAME, timm:NAME)"
    )
    plain.add_argument("--weights", type=Path, help="its weights (safetensors or torch checkpoint)")
    plain.add_argument("--input-shape", type=_shape, metavar="C,H,W", help="input shape without the batch")
    plain.add_argument("--num-classes", type=int, help="classes (default: read off the weights)")
    plain.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="folder laid out like a run: a new one, or one an earlier export --model wrote (a trained"
        " run is refused)",
    )
    plain.add_argument(
        "--data",
        type=Path,
        metavar="IMAGEFOLDER",
        help="ImageFolder tree (train/, val/ or test/) for int8 calibration and checks; without it the "
        "checks use random inputs and int8 is skipped",
    )
    plain.add_argument(
        "--mean", type=_floats, default=IMAGENET_MEAN, help="normalisation mean (default ImageNet)"
    )
    plain.add_argument(
        "--std", type=_floats, default=IMAGENET_STD, help="normalisation std (default ImageNet)"
    )
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Run the export and print one line per file; failures raise the error that sets the exit code."""
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if not math.isfinite(args.max_top1_drop_int8):
        # `>= 0` below would read nan as "quantize every layer", and inf as "any drop will do".
        raise UsageError(
            f"--max-top1-drop-int8 {args.max_top1_drop_int8}: expected a finite number of top-1 points"
        )
    options = {
        "formats": parse_formats(args.formats),
        "calib_samples": args.calib_samples,
        "calib_method": args.calib_method,
        "max_top1_drop_int8": args.max_top1_drop_int8 if args.max_top1_drop_int8 >= 0 else None,
        "check_samples": args.check_samples,
        "check_device": args.check_device,
        "bake_preprocessing": args.bake_preprocessing,
        "opset": args.opset,
        "tensorrt": TensorRTOptions(
            min_batch=args.trt_batch[0],
            opt_batch=args.trt_batch[1],
            max_batch=args.trt_batch[2],
            workspace_mib=args.trt_workspace_mib,
            optimization_level=args.trt_opt_level,
            compatibility=args.trt_compat,
            dla_core=args.dla_core,
            gpu_fallback=args.gpu_fallback,
        ),
        "log": log,
    }
    plain = (args.model, args.weights, args.input_shape, args.out)
    if args.run is not None:
        if any(v is not None for v in (*plain, args.data, args.num_classes)):
            raise UsageError("give either RUN or --model/--weights/--input-shape/--out, not both")
        require_deployable_run(args.run, "export")
        summary = export_run(args.run, **options)
    else:
        if any(v is None for v in plain):
            raise UsageError("expected RUN, or all of --model, --weights, --input-shape and --out")
        summary = export_model(
            args.model,
            args.weights,
            args.input_shape,
            args.out,
            num_classes=args.num_classes,
            data_dir=args.data,
            mean=args.mean,
            std=args.std,
            **options,
        )
    print(f"checked on {summary.check_data}")
    for rel, entry in summary.files.items():
        check = summary.checks.get(rel)
        status = check.reason if check else "written"
        print(f"ok      {rel}  {entry['size_bytes'] / 1e6:.2f} MB  {status}")
    for rel, reason in summary.failed.items():
        print(f"FAILED  {rel}.failed  {reason}")
    for fmt, reason in summary.skipped.items():
        print(f"skipped {fmt}: {reason}")
    summary.raise_for_status()
    return 0
