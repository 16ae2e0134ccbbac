"""The names of everything inside a run directory: the one place that spells them.

A run directory is the contract between the stages (distill, export, validate, bench, report,
predict, triton). Every name below is relative to the run directory, written with forward slashes
as the manifest records it; join it to a run with `run_path`.
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
STUDENT_WEIGHTS = "student.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoints/last.pt"
PIPELINE = "pipeline.json"
TEACHER_DIR = "teacher"
TEACHER_WEIGHTS = "teacher.safetensors"  # in TEACHER_DIR of a distill run, or a teacher run's own
BASELINE_DIR = "baseline_ce"
QAD_DIR = "qad"  # `reviewkd quantize`: the quantization-aware fine-tuning run

EXPORT_DIR = "export"
FP32_ONNX = f"{EXPORT_DIR}/student.onnx"
TIMING_CACHE = f"{EXPORT_DIR}/tensorrt.timing.cache"
FAILED_SUFFIX = ".failed"

REPORT_DIR = "report"
VALIDATE_FILE = "validate.json"
BENCH_FILE = "bench.json"
VALIDATE_RESULT = f"{REPORT_DIR}/{VALIDATE_FILE}"
BENCH_RESULT = f"{REPORT_DIR}/{BENCH_FILE}"
REPORT_JSON = f"{REPORT_DIR}/report.json"
REPORT_MARKDOWN = f"{REPORT_DIR}/report.md"
REPORT_HTML = f"{REPORT_DIR}/report.html"


# The top-level entries of a run that the stages write: files, and folders written anywhere below.
# Before a command's first write, deploy.run_lock checks that none of them leads out of the run
# through a symbolic link (deploy.fileio.check_no_link_leaves); a name added above belongs here.
WRITTEN_ENTRIES: tuple[str, ...] = tuple(
    dict.fromkeys(
        name.split("/")[0]
        for name in (
            MANIFEST,
            CONFIG,
            STUDENT_WEIGHTS,
            METRICS,
            CHECKPOINT,
            PIPELINE,
            TEACHER_DIR,
            TEACHER_WEIGHTS,
            BASELINE_DIR,
            QAD_DIR,
            EXPORT_DIR,
            REPORT_DIR,
        )
    )
)


def onnx_file(tag: str) -> str:
    """The exported ONNX file of a tag: "fp32" is export/student.onnx, else export/student.<tag>.onnx."""
    return FP32_ONNX if tag == "fp32" else f"{EXPORT_DIR}/student.{tag}.onnx"


# `reviewkd quantize`'s Q/DQ files: the TensorRT flavour (symmetric) and the ONNX Runtime one (uint8).
QAD_TRT_ONNX = onnx_file("int8.qad.trt")
QAD_CPU_ONNX = onnx_file("int8.qad")


def engine_file(precision: str) -> str:
    """The TensorRT engine built at `precision`: export/student.<precision>.plan."""
    return f"{EXPORT_DIR}/student.{precision}.plan"


def run_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    """The path of one of the names above inside `run_dir`."""
    return Path(run_dir) / name
