"""`reviewkd doctor`: check that this install can run, and print the one-line fix for what cannot."""

from __future__ import annotations

import argparse
import json

from deploy.doctor import collect, diagnose, format_diagnosis
from deploy.errors import MissingDependencyError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the doctor subcommand."""
    parser = subparsers.add_parser(
        "doctor",
        help="check the install: one ONNX Runtime, one CUDA major, the driver, the GPU paths",
        description=(
            "Report the installed ONNX Runtime distributions, the CUDA major each of torch, TensorRT,"
            " ONNX Runtime and the CUDA bindings was built for against the driver's, and whether the GPU"
            " paths can run, with a one-line fix for each problem. Exits 3 when a problem was found."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.set_defaults(handler=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    """Handler of `reviewkd doctor`."""
    snapshot = collect()
    diagnosis = diagnose(snapshot)
    if args.json:
        print(json.dumps({"machine": snapshot.machine, "gpu": snapshot.gpu, **diagnosis.as_dict()}, indent=2))
    else:
        print(format_diagnosis(snapshot, diagnosis))
    if not diagnosis.ok:
        raise MissingDependencyError("the install has problems; each one's fix is printed above")
    return 0
