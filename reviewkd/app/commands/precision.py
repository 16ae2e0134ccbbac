"""Precision commands: where a lower-precision file departs from fp32, layer by layer.

layerwise RUN --format onnxruntime/int8-trt [--images N]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from deploy.formats import LOWER_PRECISION_FILES, QAD_FILES
from deploy.optional import optional_import


def _labels(labels: Iterable[str]) -> str:
    """Format labels as --format takes them: "onnxruntime/int8, onnxruntime/fp16"."""
    return ", ".join(f"onnxruntime/{label}" for label in labels)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the layerwise subcommand."""
    parser = subparsers.add_parser(
        "layerwise",
        help="layer-wise parity of an exported int8/fp16 file against fp32, mapped to module paths",
        description=(
            "Run RUN/export/student.onnx and the chosen lower-precision file with every intermediate "
            "tensor exposed, on the run's images (a classifier's first validation images; a detector's "
            "held-out images, those export checks its files on); report each layer's cosine similarity "
            "and relative L2 error against fp32 in graph order, with the student's module path, up to "
            "the end outputs (a classifier's logits; a detector's head outputs, before its box decoding "
            "and NMS), and mark the layer where the error jumps. The end outputs are also compared as "
            "deployed; a detector's files are scored by mAP on the same images as deployed, with the "
            "drop. Writes RUN/report/layerwise_FORMAT.md, .json and .png, which `reviewkd report` shows."
        ),
    )
    parser.add_argument("run", type=Path, metavar="RUN", help="an exported run directory")
    parser.add_argument(
        "--format",
        default="onnxruntime/int8-trt",
        help=(
            f"{_labels(label for label in LOWER_PRECISION_FILES if label not in QAD_FILES)}, or the QAD"
            f" files of `reviewkd quantize` (a classifier's): {_labels(QAD_FILES)} (default %(default)s)"
        ),
    )
    parser.add_argument("--images", type=int, default=64, help="images to compare on (default 64)")
    parser.set_defaults(handler=_layerwise)


def _layerwise(args: argparse.Namespace) -> int:
    with optional_import("reviewkd layerwise"):
        from export.layerwise import debug_run, end_lines

    report, paths = debug_run(args.run, args.format, args.images)
    worst = report.worst_jump
    print(f"{len(report.layers)} layers compared on {report.images} images ({report.source})")
    if worst is not None:
        print(
            f"error jumps at {worst.module} ({worst.node}): relative L2 {worst.rel_l2:.4f},"
            f" +{worst.jump:.4f} over its inputs"
        )
    for line in end_lines(report, args.format):
        print(line)
    print(f"report: {paths['md']}")
    return 0
