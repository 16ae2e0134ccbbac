"""`reviewkd layerwise`'s options name what export.layerwise compares, from the format registry."""

from __future__ import annotations

import argparse

from deploy import run_layout
from deploy.formats import QAD_FILES, export_advice
from export.layerwise import comparable_files
from reviewkd.app.cli import build_parser


def _format_help() -> str:
    subparsers = next(
        a for a in build_parser("layerwise")._actions if isinstance(a, argparse._SubParsersAction)
    )
    layerwise = subparsers.choices["layerwise"]
    action = next(a for a in layerwise._actions if "--format" in a.option_strings)
    assert action.help is not None
    return action.help


def test_the_format_help_names_every_file_layerwise_compares_and_no_other() -> None:
    named = {
        word.strip(",():").removeprefix("onnxruntime/") for word in _format_help().split() if "/" in word
    }
    assert named == set(comparable_files())
    assert set(comparable_files()) >= set(QAD_FILES) | {"fp16", "int8", "int8-trt"}


def test_qad_files_are_labelled_from_their_names_and_advised_to_quantize() -> None:
    assert QAD_FILES == {"int8-qad": run_layout.QAD_CPU_ONNX, "int8-qad-trt": run_layout.QAD_TRT_ONNX}
    for label in QAD_FILES:
        assert "reviewkd quantize" in export_advice("RUN", f"onnxruntime/{label}")
        assert comparable_files()[label][1].startswith("reviewkd quantize")
    assert "--formats int8-trt" in export_advice("RUN", "onnxruntime/int8-trt")
