"""The `reviewkd` command line: one entry point over every stage.

Each stage's package owns its subcommands in a module with `register(subparsers)`, which adds
its parsers and sets `handler=<function(args) -> exit code>` on each. This module only collects
them and maps errors to exit codes: 0 success, 1 a gate failed, 2 bad input or usage,
3 an optional dependency (TensorRT, a GPU) is missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deploy.errors import ReviewKDError

# Order here is the order `reviewkd --help` lists the commands in.
COMMAND_MODULES: tuple[str, ...] = (
    "reviewkd.commands.run",
    "reviewkd.commands.train",
    "reviewkd.commands.export",
    "reviewkd.commands.quantize",
    "reviewkd.commands.serve",
    "reviewkd.commands.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every stage's subcommands registered."""
    parser = argparse.ArgumentParser(
        prog="reviewkd",
        description="Distil a classifier with ReviewKD, export it to ONNX/TensorRT and validate it.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ReviewKDError as exc:
        print(f"reviewkd {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"reviewkd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
