"""benchmarks.runs: the formats of a run and the reference they are compared with."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import runs
from deploy.errors import MissingDependencyError
from deploy.manifest import read_manifest
from deploy.runners import available_providers
from tests.helpers import add_fp16_file, make_run


def test_a_run_without_student_weights_is_compared_with_its_fp32_onnx_file(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    reference, note = runs.choose_reference(run, read_manifest(run))
    assert reference == "onnxruntime/fp32"
    assert note is not None and "the run has no student.safetensors" in note
    keys = [t.key for t in runs.run_targets(run, device="cpu", with_reference=True)]
    assert keys == ["onnxruntime/fp32"]  # no torch/* formats: the run has no student to run


def test_the_onnx_reference_runs_on_the_cpu_whatever_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = make_run(tmp_path)
    add_fp16_file(run)
    # As on a Jetson: a GPU for TensorRT, and ONNX Runtime without its CUDA provider.
    monkeypatch.setattr(runs, "resolve_device", lambda device: "cuda")
    targets = {t.key: t for t in runs.run_targets(run, device="cuda", with_reference=True)}
    with targets["onnxruntime/fp32"].opener() as reference:
        assert reference.device == "cpu"
    if "CUDAExecutionProvider" not in available_providers():
        with pytest.raises(MissingDependencyError, match="CUDA execution provider"):
            targets["onnxruntime/fp16"].opener()  # the measured formats run where they were asked to
