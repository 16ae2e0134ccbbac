"""`reviewkd export-data RUN --out FOLDER`: the run's validation split as an image folder, for
`reviewkd validate RUN --data FOLDER` on a device that lacks the dataset (benchmarks.split_export)."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.split_export import export_validation_split
from deploy.tasks import require_deployable_run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the export-data subcommand."""
    parser = subparsers.add_parser(
        "export-data",
        help="write the run's validation split as an image folder (one sub-folder per class)",
        description="Write the run's validation images to a new folder, one sub-folder per class, for"
        " `reviewkd validate RUN --data FOLDER` on another machine. An ImageFolder run's files are"
        " copied; a digits or CIFAR split is rebuilt (needs PyTorch) and written as PNG files.",
    )
    parser.add_argument("run", type=Path, metavar="RUN", help="run directory")
    parser.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="a new or empty folder")
    parser.add_argument(
        "--limit", type=int, default=None, help="at most this many images, spread evenly over the split"
    )
    parser.set_defaults(handler=run_export_data)


def run_export_data(args: argparse.Namespace) -> int:
    """Handler of `reviewkd export-data`."""
    require_deployable_run(args.run, "export-data")
    written = export_validation_split(args.run, args.out, args.limit)
    print(
        f"{written.folder}: {written.images} images of {written.classes} classes ({written.source});"
        f" validate with `reviewkd validate {args.run} --data {written.folder}`"
    )
    return 0
