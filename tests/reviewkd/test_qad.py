"""Quantization-aware ReviewKD on a real (tiny) digits run: int8 accuracy against post-training int8,
the manifest record, SIGKILL and resume, usage errors. Short real runs at 8x8 on one thread."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deploy import run_layout
from deploy.manifest import read_manifest, verify_artifact
from export.layerwise import debug_run
from export.pipeline import export_run
from export.qad_export import export_qad
from reviewkd.app.cli import main
from reviewkd.checkpoint import load_checkpoint
from reviewkd.config import load_config
from reviewkd.engine import distill
from reviewkd.qad import quantize_run
from reviewkd.run_record import read_metrics
from tests.helpers import REPO_ROOT

# All of digits (1,437 training images) at 8x8: enough steps for a student whose int8 top-1 means something.
TINY = [
    "data.image_size=8",
    "train.threads=1",
    "train.device=cpu",
    "teacher.arch=cifar_resnet20",
    "teacher.epochs=1",
    "train.epochs=3",
    "data.subset=null",  # every training image for teacher and student, not the demo's 50
]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ReviewKD run (its teacher trained first) with its post-training int8 files exported."""
    run = tmp_path_factory.mktemp("qad") / "run"
    distill(load_config(None, TINY), run)
    export_run(run, ["onnx", "int8-trt"])
    return run


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_qad_files_reproduce_the_selected_student_and_pass_the_int8_gate(
    distilled: Path, tmp_path: Path
) -> None:
    # Whether fine-tuning beats post-training int8 is an empirical result (benchmarks/RESULTS.md); on
    # this 3-epoch student with a 1-epoch teacher it does not. What QAD guarantees: it never hands
    # export a student worse than its calibrated start, and its files compute that student.
    run = _copy(distilled, tmp_path / "run")
    result = quantize_run(run, 1)
    summary = export_qad(run)
    manifest = read_manifest(run)
    checks = manifest["export"]["checks"]
    qad = manifest["qad"]
    selected_top1 = max(qad["calibrated"]["top1"], qad["fine_tuned"]["top1"])
    for rel in (run_layout.QAD_TRT_ONNX, run_layout.QAD_CPU_ONNX):
        assert checks[rel]["n"] == checks["export/student.int8.trt.onnx"]["n"]
        assert rel not in summary.failed, checks[rel]["reason"]
        # Unfused Q/DQ (as the files run) compute the fake-quantized student up to rounding ties.
        assert checks[rel]["qad_top1_agreement"] >= 99.0
        assert abs(checks[rel]["top1"] - selected_top1) <= 1.0
        assert checks[rel]["device"] == "cpu"  # the session's own providers: QAD checks on the CPU
        entry = manifest["artifacts"][rel]
        assert entry["kind"] == "onnx" and entry["precision"] == "int8"
        assert entry["calibration"]["method"] == "qad"
        assert entry["onnxruntime_unfused_qdq"] is True and entry["weight_bits"] == 8
        verify_artifact(run, manifest, rel)
    assert qad["method"] == "reviewkd+kd" and qad["epochs"] == 1
    fine_tuned_won = qad["fine_tuned"]["top1"] >= qad["calibrated"]["top1"]
    assert qad["selected"] == ("fine_tuned" if fine_tuned_won else "calibrated")
    assert qad["weights"] == result.weights.relative_to(run).as_posix()
    assert result.top1 == qad["fine_tuned"]["top1"]
    assert qad["quantizers"]["residual_adds"] == 9
    assert [r["epoch"] for r in read_metrics(run / "qad" / "metrics.jsonl")] == [1]
    # Layer-wise parity reads the QAD files too, with the student's module paths.
    for label in ("int8-qad-trt", "int8-qad"):
        report, paths = debug_run(run, f"onnxruntime/{label}", 8)
        assert {"layer1.0.conv1", "layer3.2.conv2"} <= {layer.module for layer in report.layers}
        assert paths["md"].name == f"layerwise_{label}.md" and paths["md"].is_file()


def _wait_for_epoch(proc: subprocess.Popen[bytes], qad_dir: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not read_metrics(qad_dir / "metrics.jsonl") or not (qad_dir / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, "QAD ended before it could be killed"
        assert time.monotonic() < deadline, "no QAD epoch finished in time"
        time.sleep(0.05)


def test_qad_resumes_after_sigkill_and_a_move_to_the_uninterrupted_result(
    distilled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = _copy(distilled, tmp_path / "reference")
    quantize_run(reference, 3)
    run = _copy(distilled, tmp_path / "run")
    cli = [sys.executable, "-m", "reviewkd.app.cli", "quantize", str(run), "--epochs", "3"]
    proc = subprocess.Popen(cli, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_epoch(proc, run / "qad")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(run / "qad" / "metrics.jsonl")) < 3
    # Resumed from another place: the QAD config spells its student and teacher paths from RUN.
    run = Path(shutil.move(run, tmp_path / "moved"))
    code = main(["quantize", str(run), "--epochs", "3", "--resume"])
    assert "resuming" in capsys.readouterr().out
    failed = read_manifest(run)["export"]["failed"]
    assert code == (1 if failed else 0)
    assert [r["epoch"] for r in read_metrics(run / "qad" / "metrics.jsonl")] == [1, 2, 3]
    got = load_checkpoint(run / "qad" / "checkpoints" / "last.pt").student
    want = load_checkpoint(reference / "qad" / "checkpoints" / "last.pt").student
    assert got.keys() == want.keys() and any(k.endswith("output_quantizer.amax") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed QAD differs from the uninterrupted one"
    got_qad, want_qad = read_manifest(run)["qad"], read_manifest(reference)["qad"]
    for key in ("top1", "epoch"):
        assert got_qad["fine_tuned"][key] == want_qad["fine_tuned"][key]
    assert got_qad["selected"] == want_qad["selected"]
    # Compared by tensors: safetensors writes its metadata in a per-process order, so bytes may differ.
    best, best_reference = load_file(run / got_qad["weights"]), load_file(reference / want_qad["weights"])
    assert best.keys() == best_reference.keys()
    assert all(torch.equal(best[k], best_reference[k]) for k in best_reference)


def test_usage_errors_exit_2(distilled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(tmp_path), "--epochs", "1"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    run = _copy(distilled, tmp_path / "run")
    assert main(["quantize", str(run), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    (run / "qad" / "checkpoints").mkdir(parents=True)
    (run / "qad" / "checkpoints" / "last.pt").write_bytes(b"")
    assert main(["quantize", str(run), "--epochs", "1"]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_the_teacher_comes_from_the_run_or_from_teacher_never_from_the_manifests_path(tmp_path: Path) -> None:
    from deploy.errors import UsageError
    from deploy.fileio import sha256_file
    from deploy.manifest import new_manifest
    from reviewkd.qad import _teacher_weights

    run = tmp_path / "copied-run"
    own = run / "teacher" / "teacher.safetensors"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"the teacher's weights")
    original = tmp_path / "original-run" / "teacher" / "teacher.safetensors"  # what a copy still records
    original.parent.mkdir(parents=True)
    original.write_bytes(own.read_bytes())
    manifest = new_manifest()
    manifest["teacher"] = {"arch": "cifar_resnet20", "weights": str(original), "sha256": sha256_file(own)}
    assert _teacher_weights(run, manifest, None) == own
    assert _teacher_weights(run, manifest, original) == original  # named by the user: fine
    own.unlink()
    with pytest.raises(UsageError, match="pass its weights with --teacher FILE"):
        _teacher_weights(run, manifest, None)
    # RUN/teacher linked out of the run is no teacher of the run's either.
    own.parent.rmdir()
    own.parent.symlink_to(original.parent)
    with pytest.raises(UsageError, match="resolves outside the run directory"):
        _teacher_weights(run, manifest, None)
