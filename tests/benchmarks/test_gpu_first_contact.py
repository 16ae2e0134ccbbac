"""The GPU first-contact script on the CPU: its no-GPU exit, its step recorder, and the steps that run here.

The steps themselves need a CUDA GPU; here the script must refuse with exit 3 and one line that says
why, and the parts that need no GPU (the recorder, the ONNX Runtime step's error path) run for real.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.scripts import gpu_first_contact as script
from tests.helpers import REPO_ROOT

NO_GPU = not torch.cuda.is_available()


@pytest.mark.skipif(not NO_GPU, reason="checks the path taken without a GPU")
def test_without_a_gpu_it_exits_3_with_one_line_and_the_findings_in_its_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scripts.gpu_first_contact", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_first_contact: no usable CUDA GPU: ")
    # The probes' own reasons, not a bare "no GPU": torch's words and what cuda-python returned.
    assert "torch" in lines[0] and "cuda-python" in lines[0]
    # What a first run on a machine without a usable GPU still learns: the install's findings.
    record = json.loads((out / script.RESULT_FILE).read_text())
    assert record["no_gpu"].startswith("no usable CUDA GPU: ")
    assert list(record["steps"]) == ["doctor"] and record["steps"]["doctor"]["status"] == "ok"
    assert record["steps"]["doctor"]["findings"][0]["component"] == "onnxruntime"


def test_the_pytest_step_is_skipped_with_the_reason_where_pytest_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else real_find_spec(name, *a)
    )
    recorder = script.Recorder(tmp_path / script.RESULT_FILE, budget_s=60)
    recorder.step("pytest_gpu", lambda: script.pytest_gpu(30))
    entry = json.loads(recorder.path.read_text())["steps"]["pytest_gpu"]
    assert entry["status"] == "skipped" and "pytest is not installed" in entry["reason"]


def test_recorder_keeps_every_step_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / script.RESULT_FILE
    recorder = script.Recorder(path, budget_s=60)

    def broken() -> dict[str, object]:
        raise RuntimeError("cudaErrorLaunchFailure")

    recorder.step("first", lambda: {"value": 1})
    assert json.loads(path.read_text())["steps"]["first"]["status"] == "ok"  # written after each step
    recorder.step("second", broken)
    recorder.step("third", lambda: {"value": 3}, needs_s=3600)
    steps = json.loads(path.read_text())["steps"]
    assert steps["first"]["value"] == 1 and steps["first"]["seconds"] >= 0
    assert steps["second"]["status"] == "error"
    assert steps["second"]["error"] == "RuntimeError: cudaErrorLaunchFailure"
    assert any("cudaErrorLaunchFailure" in line for line in steps["second"]["traceback"])
    assert steps["third"] == {"status": "skipped", "reason": "under 3600 s of budget left"}


def test_onnxruntime_step_reports_a_cuda_provider_that_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    assert "no CUDA provider" in script.onnxruntime_cuda(tmp_path)["status_detail"]
    # onnxruntime-gpu on a machine whose CUDA cannot load: listed, then a CPU session. The step
    # exports the small CNN with the project's exporter and records the exit-3 error.
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    result = script.onnxruntime_cuda(tmp_path)
    assert result["cuda_provider_loads"] is False
    assert "could not load CUDAExecutionProvider" in result["error_exit_3"]
    assert (tmp_path / "small_cnn.onnx").is_file()


def test_tf32_switch_restores_torch_settings() -> None:
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with script.tf32(not before[0]):
        assert torch.backends.cudnn.allow_tf32 is (not before[0])
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_a_failed_or_timed_out_command_is_an_error_step(tmp_path: Path) -> None:
    recorder = script.Recorder(tmp_path / script.RESULT_FILE, budget_s=60)
    fails = [sys.executable, "-c", "import sys; print('loss is nan'); sys.exit(2)"]
    recorder.step("fails", lambda: script.run_command(fails, timeout_s=60))
    recorder.step(
        "hangs",
        lambda: script.run_command([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5),
    )
    recorder.step("passes", lambda: script.run_command([sys.executable, "-c", "print('ok')"], timeout_s=60))
    steps = json.loads(recorder.path.read_text())["steps"]
    assert steps["fails"]["status"] == "error" and steps["fails"]["error"] == "exited with 2"
    assert "loss is nan" in steps["fails"]["tail"]  # the output stays beside the error
    assert steps["hangs"]["status"] == "error" and steps["hangs"]["error"] == "timed out after 0 s"
    assert steps["passes"]["status"] == "ok" and steps["passes"]["exit_code"] == 0


def test_the_export_step_runs_both_check_devices_and_compares_their_verdicts(tmp_path: Path) -> None:
    """The export step on a real tiny run (its fp32 and fp16 files): on this machine auto resolves
    as the export itself resolves it, and both exports give the same verdicts."""
    from reviewkd.app.cli import main

    run = tmp_path / "digits"
    tiny = ["data.image_size=8", "data.subset=160", "data.val_split=null", "train.threads=1"]
    assert (
        main(["distill", "--out", str(run), *tiny, "train.device=cpu", "method.name=ce", "train.epochs=1"])
        == 0
    )
    result = script.export_check_device(run, tmp_path, timeout_s=240, formats="onnx,fp16")
    assert "status" not in result, result.get("error")
    assert result["same_verdicts"] is True
    for device in ("cpu", "auto"):
        entry = result[device]
        assert entry["exit_code"] == 0
        assert set(entry["checks"]) == {"export/student.onnx", "export/student.fp16.onnx"}
        assert entry["checks"]["export/student.onnx"]["max_abs_diff"] <= script.FP32_GATE
        assert [s["stage"] for s in entry["reference_stages"]] == ["reference logits (PyTorch)"]
    assert result["cpu"]["check_device"] == {"torch": "cpu", "onnxruntime": "cpu", "notes": []}
    assert {c["device"] for c in result["cpu"]["checks"].values()} == {"cpu"}
    if NO_GPU:
        assert result["auto"]["check_device"]["torch"] == "cpu"
    # The run itself is left as it was: each export worked on its own copy.
    assert "export" not in json.loads((run / "manifest.json").read_text())


def test_the_export_step_is_skipped_without_a_trained_run(tmp_path: Path) -> None:
    result = script.export_check_device(tmp_path / "digits", tmp_path, timeout_s=60)
    assert result["status"] == "skipped" and "has no trained student" in result["reason"]


def _exports(
    auto_device: dict[str, Any], auto_status: str = "ok", auto_verdict: str = "ok"
) -> dict[str, Any]:
    checks = {"export/student.onnx": {"status": "ok"}}
    return {
        "cpu": {"checks": checks, "check_device": {"torch": "cpu", "onnxruntime": "cpu", "notes": []}},
        "auto": {
            "checks": {"export/student.onnx": {"status": auto_verdict}},
            "check_device": auto_device,
            **({"status": "error"} if auto_status == "error" else {}),
        },
    }


def test_the_export_step_flags_a_failed_export_different_verdicts_and_a_gpu_left_unused() -> None:
    on_gpu = {"torch": "cuda", "onnxruntime": "cuda", "notes": []}
    torch_only = {"torch": "cuda", "onnxruntime": "cpu", "notes": ["ONNX Runtime on the CPU: why"]}
    both = {"torch": True, "onnxruntime": True}
    cases = [
        (_exports(on_gpu), both, None),
        (_exports(torch_only), {"torch": True, "onnxruntime": False}, None),  # a CPU onnxruntime
        (_exports(torch_only), both, "auto left onnxruntime on the CPU: ['ONNX Runtime on the CPU: why']"),
        (
            _exports(on_gpu, auto_verdict="failed"),
            both,
            "the verdicts differ between --check-device cpu and auto",
        ),
        (_exports(on_gpu, auto_status="error"), both, "export --check-device auto failed"),
    ]
    for results, sides, error in cases:
        script.judge_export_devices(results, sides)
        assert results.get("error") == error
        assert (results.get("status") == "error") is (error is not None)
