"""The format registry: which backend runs which file kind, the precisions, and export's formats.

One table for every layer: export writes the files named here, the runners open them by suffix,
validate/bench/report key their results "<backend>/<label>" from them, and predict picks a run's
file by backend and precision.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import run_layout
from deploy.errors import TRAIN_EXTRA_HINT
from deploy.optional import installed

# Manifest artifact kind of a model file -> the backend that runs it, in report order.
BACKEND_OF_KIND: dict[str, str] = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}
KIND_OF_BACKEND: dict[str, str] = {backend: kind for kind, backend in BACKEND_OF_KIND.items()}
# Backends that run a module in-process rather than a file (the student's weights).
MODULE_BACKENDS: tuple[str, ...] = ("torch",)
ALL_BACKENDS: tuple[str, ...] = (*MODULE_BACKENDS, *BACKEND_OF_KIND.values())
# File suffix -> manifest kind.
KIND_OF_SUFFIX: dict[str, str] = {".onnx": "onnx", ".plan": "tensorrt", ".engine": "tensorrt"}

# Precisions from the widest to the narrowest: the order reports list formats in.
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4")


@dataclass(frozen=True)
class ExportFormat:
    """One format `reviewkd export --formats` names: the file it writes and what that file holds."""

    name: str
    kind: str  # manifest kind: "onnx" or "tensorrt"
    precision: str
    file: str  # run-relative path ("tensorrt" writes one engine per precision instead)
    flavour: str


# ONNX formats, in the order export writes them (each one after fp32 is made from the fp32 file).
ONNX_FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat("onnx", "onnx", "fp32", run_layout.onnx_file("fp32"), "fp32"),
    "fp16": ExportFormat("fp16", "onnx", "fp16", run_layout.onnx_file("fp16"), "fp16"),
    # uint8-activation Q/DQ: the fastest int8 on ONNX Runtime CPUs.
    "int8": ExportFormat("int8", "onnx", "int8", run_layout.onnx_file("int8"), "cpu"),
    # symmetric Q/DQ (zero points 0, per-channel weights): what TensorRT builds int8 engines from.
    "int8-trt": ExportFormat("int8-trt", "onnx", "int8", run_layout.onnx_file("int8.trt"), "trt"),
}
# fp32 with preprocessing baked in (uint8 NHWC input), written with --bake-preprocessing.
UINT8_INPUT = ExportFormat("uint8", "onnx", "fp32", run_layout.onnx_file("uint8"), "uint8-input")
TENSORRT_FORMAT = "tensorrt"
ALL_EXPORT_FORMATS: tuple[str, ...] = (*ONNX_FORMATS, TENSORRT_FORMAT)
# A detector's fp32 file whose NMS is TensorRT's EfficientNMS_TRT plugin: its fp32 engine's source.
# Its manifest kind says that TensorRT builds it and ONNX Runtime cannot run it (the plugin).
EFFICIENT_NMS = ExportFormat(
    "efficientnms", "onnx-tensorrt", "fp32", run_layout.onnx_file("efficientnms"), "efficientnms"
)
# Every name --formats takes, for some task (each task exports those its producers make).
EXPORT_FORMAT_NAMES: tuple[str, ...] = (*ONNX_FORMATS, EFFICIENT_NMS.name, TENSORRT_FORMAT)
# TensorRT engine precision -> the ONNX format it is built from.
TENSORRT_SOURCES: dict[str, str] = {"fp32": "onnx", "fp16": "fp16", "int8": "int8-trt"}


def standard_file(kind: str, precision: str) -> str:
    """The file export writes for a kind at a precision (export/student.onnx for fp32 ONNX)."""
    return run_layout.onnx_file(precision) if kind == "onnx" else run_layout.engine_file(precision)


def kind_of_file(path: str | os.PathLike[str]) -> str | None:
    """The manifest kind a file's suffix announces ("onnx", "tensorrt"), or None."""
    return KIND_OF_SUFFIX.get(Path(path).suffix.lower())


def precision_family(precision: str) -> str:
    """Return the base precision of a label: "int8" for "int8", "int8-trt" or "int8_qdq"."""
    head = re.split(r"[^a-z0-9]", precision.lower(), maxsplit=1)[0]
    return head or precision


def precision_from_filename(path: str | os.PathLike[str]) -> str:
    """Return the precision a file name announces ("student.int8.onnx" -> "int8"); "fp32" if none.

    Tags may carry a flavour after the precision ("student.int8-qdq.onnx" is "int8"); the
    manifest's own "precision" field, where there is one, takes priority over this guess.
    """
    for tag in Path(path).name.lower().split(".")[1:-1]:
        for precision in PRECISIONS:
            if tag.startswith(precision):
                return precision
    return "fp32"


def format_label(relpath: str, precision: str) -> str:
    """Return the precision part of a file's report key.

    It is the precision, unless the file name carries a more specific tag that starts with it
    ("student.int8.trt.onnx" -> "int8-trt"), so two files of one precision get distinct keys.
    """
    tags = Path(relpath).name.split(".")[1:-1]
    if tags and tags[0].lower().startswith(precision.lower()):
        return "-".join(tags)
    return precision


def display_order(kind: str, precision: str) -> tuple[int, int]:
    """Sort key of a model file in reports: by backend, then from the widest precision to the narrowest."""
    kinds = tuple(BACKEND_OF_KIND)
    family = precision_family(precision)
    return (
        kinds.index(kind) if kind in kinds else len(kinds),
        PRECISIONS.index(family) if family in PRECISIONS else len(PRECISIONS),
    )


def format_keys(artifacts: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Name each model file among a manifest's artifacts: {"<backend>/<label>": run-relative path},
    in report order (`display_order`), for the files that take float32 NCHW batches (the runner
    contract's input; export's uint8-input variant, "input_dtype": "uint8", is left out).

    These are the names validate, bench and report key their results by and predict's --backend
    takes: the label is `format_label` of the entry's precision ("fp32" where it records none), so
    "onnxruntime/int8" and "onnxruntime/int8-trt" name export's two int8 files; a key two files
    would share gets the later file's stem appended.
    """

    def order(relpath: str) -> tuple[int, int, str]:
        entry = artifacts[relpath]
        return (*display_order(str(entry.get("kind")), str(entry.get("precision") or "fp32")), relpath)

    keys: dict[str, str] = {}
    for relpath in sorted(artifacts, key=order):
        entry = artifacts[relpath]
        backend = BACKEND_OF_KIND.get(str(entry.get("kind")))
        if backend is None or str(entry.get("input_dtype", "float32")) != "float32":
            continue
        key = f"{backend}/{format_label(relpath, str(entry.get('precision') or 'fp32'))}"
        if key in keys:
            key = f"{key}-{Path(relpath).stem}"
        keys[key] = relpath
    return keys


# The files `reviewkd quantize` writes (quantization-aware fine-tuning), by format label:
# "int8-qad" for ONNX Runtime's CPU kernels, "int8-qad-trt" for TensorRT.
QAD_FILES: dict[str, str] = {
    format_label(file, "int8"): file for file in (run_layout.QAD_CPU_ONNX, run_layout.QAD_TRT_ONNX)
}
# The lower-precision ONNX files a run may hold, by format label, each of which `reviewkd
# layerwise` compares with the run's fp32 file: export's fp16 and int8 files, then QAD's.
LOWER_PRECISION_FILES: dict[str, str] = {
    **{name: spec.file for name, spec in ONNX_FORMATS.items() if spec.precision != "fp32"},
    **QAD_FILES,
}

# A run's format key -> the `reviewkd export --formats` name that writes its file.
_EXPORT_FORMAT_OF_KEY: dict[str, str] = {
    f"{BACKEND_OF_KIND[spec.kind]}/{format_label(spec.file, spec.precision)}": name
    for name, spec in ONNX_FORMATS.items()
}


def export_advice(run_dir: str | os.PathLike[str], key: str | None = None) -> str:
    """The command that writes the run's file for the format `key` ("onnxruntime/int8-trt",
    "tensorrt/fp16"; None: every format export writes), said so that it works on this install.

    TensorRT engines are built from the run's ONNX files and need no PyTorch (TensorRT and a GPU
    instead); ONNX files are made from the PyTorch student, QAD files by `reviewkd quantize`, so
    where torch is not installed the advice says so and names the extra that brings it.
    """
    backend = key.partition("/")[0] if key else None
    if backend == BACKEND_OF_KIND["tensorrt"]:
        return f"`reviewkd export {run_dir} --formats {TENSORRT_FORMAT}` (TensorRT and a GPU, no PyTorch)"
    label = key.partition("/")[2] if key else ""
    if label in QAD_FILES:
        command = f"`reviewkd quantize {run_dir}`"
    elif key in _EXPORT_FORMAT_OF_KEY:
        command = f"`reviewkd export {run_dir} --formats {_EXPORT_FORMAT_OF_KEY[key]}`"
    else:
        command = f"`reviewkd export {run_dir}`"
    if installed("torch"):
        return command
    return f"{command} where PyTorch is installed (this install has none: {TRAIN_EXTRA_HINT})"
