"""export's own ONNX Runtime sessions: deploy's semantics, one thread per usable CPU, no spinning."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deploy.runners.onnxruntime_runner import qdq_fusion_disabled
from export.check import open_check_session, run_onnx, session_threads
from export.precision import quantize_int8
from tests.helpers import INPUT_SHAPE, export_onnx, tiny_net


def test_threads_are_the_cpus_this_process_may_use() -> None:
    assert session_threads() == len(os.sched_getaffinity(0))


def test_check_sessions_sleep_when_idle_and_keep_the_files_semantics(tmp_path: Path) -> None:
    fp32 = export_onnx(tiny_net(), tmp_path / "fp32.onnx")
    images = [np.random.default_rng(0).standard_normal((16, *INPUT_SHAPE)).astype(np.float32)]
    quantize_int8(fp32, tmp_path / "trt.onnx", images, flavour="trt")
    for path, unfused in ((fp32, False), (tmp_path / "trt.onnx", True)):
        session = open_check_session(path)
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert options.intra_op_num_threads == session_threads()
        assert qdq_fusion_disabled(session) is unfused  # the trt file runs as TensorRT computes it
    assert run_onnx(fp32, images).shape == (16, 4)
