"""`reviewkd run`: teacher, distill, export, validate, bench and report in one command.

Each stage records what it read and wrote (paths and sha256) in RUN/pipeline.json; with --resume a
stage whose outputs still verify is skipped. The stages are reviewkd.app.pipeline's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.latency import parse_batch_sizes
from benchmarks.report import format_final_table
from deploy import run_layout
from reviewkd.app.pipeline import PipelineOptions, run_pipeline
from reviewkd.config import load_config, shipped_configs


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `run` subcommand."""
    parser = subparsers.add_parser(
        "run",
        help="teacher, distill, export, validate, bench and report in one go",
        description="Run the whole pipeline: train the teacher (when the config gives none), distil the "
        "student and a cross-entropy baseline, export every ONNX flavour (and TensorRT where present), "
        "validate, benchmark and report. Without --config it runs the embedded digits default.",
        epilog=f"shipped configs: {', '.join(shipped_configs())}",
    )
    parser.add_argument("--config", metavar="FILE|NAME", help="a YAML config or a shipped config's name")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR", help="run directory")
    parser.add_argument("--resume", action="store_true", help="skip the stages whose outputs verify")
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="do not train the cross-entropy student the report compares against",
    )
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for validate and bench")
    parser.add_argument(
        "--batch-sizes", default="1,8,32", metavar="1,8,32", help="bench batch sizes (default 1,8,32)"
    )
    parser.add_argument(
        "--bench-seconds", type=float, default=1.0, metavar="S", help="timing per format and batch size"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5"
    )
    parser.set_defaults(handler=run_pipeline_command)


def run_pipeline_command(args: argparse.Namespace) -> int:
    """Handler of `reviewkd run`."""
    run: Path = args.out
    source: str | Path | None = args.config
    config_file = run_layout.run_path(run, run_layout.CONFIG)
    if source is None and args.resume and config_file.is_file():
        source = config_file
    config = load_config(source, [*args.overrides, f"output.dir={run}"])
    options = PipelineOptions(
        baseline=args.baseline,
        threads=args.threads,
        batch_sizes=tuple(parse_batch_sizes(args.batch_sizes)),  # checked before any stage runs
        bench_seconds=args.bench_seconds,
    )
    started = time.perf_counter()
    report = run_pipeline(config, run, options, resume=args.resume)
    print(format_final_table(report))
    print(
        f"pipeline finished in {time.perf_counter() - started:.0f} s;"
        f" reports in {run_layout.run_path(run, run_layout.REPORT_DIR)}"
    )
    return 0
