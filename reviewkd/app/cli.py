"""The `reviewkd` command line: one entry point over every stage.

Each stage's subcommands live in a module of reviewkd.app.commands with `register(subparsers)`, which
adds its parsers and sets `handler=<function(args) -> exit code>` on each. This module only
collects them and maps errors to exit codes: 0 success, 1 a gate failed, 2 bad input or usage,
3 an optional dependency (TensorRT, a GPU, torch) is missing.

Only the module of the command being run is imported, so `reviewkd predict` starts without
loading the training stack (and works where torch is not installed). A command module imports an
optional dependency (torch, ONNX Runtime, TensorRT) only when it runs, through
deploy.optional.optional_import, which raises the exit-3 error naming the install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deploy.errors import OutputError, ReviewKDError, UsageError, printable

# Command -> the module that registers it. Order here is the order `reviewkd --help` lists them in.
COMMANDS: dict[str, str] = {
    "run": "reviewkd.app.commands.run",
    "teacher": "reviewkd.app.commands.train",
    "distill": "reviewkd.app.commands.train",
    "export": "reviewkd.app.commands.export",
    "quantize": "reviewkd.app.commands.quantize",
    "predict": "reviewkd.app.commands.predict",
    "triton": "reviewkd.app.commands.triton",
    "validate": "reviewkd.app.commands.evaluate",
    "bench": "reviewkd.app.commands.evaluate",
    "report": "reviewkd.app.commands.evaluate",
    "layerwise": "reviewkd.app.commands.precision",
    "doctor": "reviewkd.app.commands.doctor",
    "export-data": "reviewkd.app.commands.data",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser with the subcommands of `command`'s module, or of every module."""
    parser = argparse.ArgumentParser(
        prog="reviewkd",
        description="Distil a classifier with ReviewKD, export it to ONNX/TensorRT and validate it.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module_name in modules:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _command_name(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first argument that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = "reviewkd"
    try:
        # Parsing imports the command's package (torch among them): a Ctrl-C there is a start-up
        # interrupt like any other, one line and no traceback.
        args = build_parser(_command_name(arguments)).parse_args(arguments)
        command = f"reviewkd {args.command}"
        return int(args.handler(args) or 0)
    except OutputError as exc:
        if exc.salvage is not None:
            print(exc.salvage)
        print(f"{command}: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except ReviewKDError as exc:
        # Messages name files and values from the user's input: shown escaped, they stay one line.
        print(f"{command}: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # A file the system refused that no stage anticipated: still bad input, still one line.
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"{command}: error: {printable(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
