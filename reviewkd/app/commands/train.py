"""`reviewkd teacher` and `reviewkd distill`: the training stage.

teacher [--config FILE|NAME] --out DIR [--epochs N] [--device D] [--resume] [key=value ...]
    trains teacher.arch with cross-entropy; writes DIR/teacher.safetensors, metrics, manifest.
distill [--config FILE|NAME] --out DIR [--epochs N] [--device D] [--resume] [key=value ...]
    distils student.arch with method.name; without teacher.weights, trains the teacher first
    into DIR/teacher/. Writes the run directory of docs/METHOD.md section 5 (deploy.run_layout names
    its files).

Without --config the embedded default (digits) is used. With --resume and no --config, the run's own
DIR/config.yaml is the base. Overrides are dotted keys, e.g. `optim.lr=0.05 method.name=kd`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deploy import run_layout
from deploy.optional import optional_import
from reviewkd.config import DEVICES, Config, load_config, shipped_configs


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the teacher and distill subcommands."""
    specs = (
        ("teacher", "train a teacher with cross-entropy", run_teacher),
        ("distill", "distil a student from a teacher (ReviewKD, KD or the CE baseline)", run_distill),
    )
    for name, summary, handler in specs:
        parser = subparsers.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}. Every config key can be set as key=value.",
            epilog=f"shipped configs: {', '.join(shipped_configs())}; e.g. reviewkd {name} "
            "--config cifar10_resnet56_resnet20 --out runs/c10 data.root=../shared/data/cifar10",
        )
        parser.add_argument(
            "--config",
            metavar="FILE|NAME",
            help="a YAML config file or a shipped config's name (default: the embedded digits config)",
        )
        parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="run directory to write")
        parser.add_argument(
            "--epochs", type=int, metavar="N", help="override train.epochs (teacher: teacher.epochs)"
        )
        parser.add_argument(
            "--device", choices=DEVICES, help="override train.device (default auto: CUDA if present)"
        )
        parser.add_argument("--resume", action="store_true", help="continue DIR from checkpoints/last.pt")
        parser.add_argument(
            "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.05"
        )
        parser.set_defaults(handler=handler)


def resolve_cli_config(args: argparse.Namespace, epochs_key: str = "train.epochs") -> Config:
    """The config a training command runs with: file (or the run's own on --resume), overrides, flags."""
    source: str | Path | None = args.config
    config_file = run_layout.run_path(args.out, run_layout.CONFIG)
    if source is None and args.resume and config_file.is_file():
        source = config_file
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"{epochs_key}={args.epochs}")
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    overrides.append(f"output.dir={args.out}")
    return load_config(source, overrides)


def _is_rank_zero() -> bool:
    """False in the other processes of a torchrun launch, which print nothing."""
    return os.environ.get("RANK", "0") == "0"


def run_teacher(args: argparse.Namespace) -> int:
    """Handler of `reviewkd teacher`."""
    with optional_import("reviewkd teacher"):
        from reviewkd.tasks import training_task

    config = resolve_cli_config(args, epochs_key="teacher.epochs")
    path = training_task(config).train_teacher(config, args.out, resume=args.resume)
    if _is_rank_zero():
        print(f"teacher weights: {path}")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    """Handler of `reviewkd distill`."""
    with optional_import("reviewkd distill"):
        from reviewkd.tasks import training_task

    config = resolve_cli_config(args)
    path = training_task(config).distill(config, args.out, resume=args.resume)
    if _is_rank_zero():
        print(f"student weights: {path}")
    return 0
