"""`reviewkd validate` exit codes: 1 is a gate that failed, and only that.

Issue 11 items 3, 15 and 16: a gate naming an unknown precision, an impossible or non-finite
threshold, and a missing, tampered or malformed file are bad input: exit 2, with one line naming
the option or the file; a gate that fails on good files is exit 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reviewkd.app.cli import main
from tests.helpers import CLASSES, add_fp16_file, make_run, run_reviewkd, write_class_folders


@pytest.fixture
def run_and_data(tmp_path: Path) -> tuple[Path, Path]:
    run, _ = make_run(tmp_path)
    add_fp16_file(run)
    return run, write_class_folders(tmp_path / "val", CLASSES)


def test_a_good_run_validates_and_a_failing_gate_is_exit_1(run_and_data: tuple[Path, Path]) -> None:
    run, data = run_and_data
    assert run_reviewkd("validate", run, "--data", data).returncode == 0
    # A gate no fp16 file can meet on these logits: max |diff| of 0 against the fp32 file.
    failed = run_reviewkd("validate", run, "--data", data, "--gate", "fp16:max_abs_diff=0")
    assert failed.returncode == 1
    assert "onnxruntime/fp16: gate max_abs_diff failed" in failed.stderr


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        (["--gate", "in8:max_top1_drop=0"], "unknown precision 'in8'"),
        (["--gate", "INT8:max_top1_drop=0"], "unknown precision 'INT8'"),
        (["--max-abs-diff-fp32", "-1"], "--max-abs-diff-fp32: max_abs_diff = -1 can never be met"),
        (["--max-abs-diff-fp32", "nan"], "--max-abs-diff-fp32: the threshold must be a finite number"),
        (["--gate", "fp16:min_agreement=150"], "min_agreement = 150 can never be met"),
        (["--gate", "int8:min_top1=200"], "min_top1 = 200 can never be met"),
        (["--gate", "fp32:max_top1_drop=inf"], "the threshold must be a finite number"),
        (["--min-agreement-fp16", "100.5"], "--min-agreement-fp16: min_agreement = 100.5"),
    ],
)
def test_bad_gates_exit_2_before_anything_runs(
    run_and_data: tuple[Path, Path], option: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = run_and_data
    assert main(["validate", str(run), "--data", str(data), *option]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err
    assert not (run / "report").exists()  # refused at parse: nothing measured, nothing written


def test_a_mistyped_gate_through_the_real_command_line_exits_2(run_and_data: tuple[Path, Path]) -> None:
    run, data = run_and_data
    completed = run_reviewkd("validate", run, "--data", data, "--gate", "in8:max_top1_drop=0")
    assert completed.returncode == 2 and "unknown precision 'in8'" in completed.stderr


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _malform(path: Path, run: Path) -> None:
    path.write_bytes(b"not an onnx file at all")
    manifest_file = run / "manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    import hashlib

    entry = manifest["artifacts"]["export/student.fp16.onnx"]
    entry.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size_bytes=path.stat().st_size)
    manifest_file.write_text(json.dumps(manifest), encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("missing", "listed in the manifest but missing"),
        ("tampered", "does not match the manifest"),
        ("malformed", "cannot load as an ONNX model"),
    ],
)
def test_a_missing_tampered_or_malformed_file_is_exit_2_not_a_failed_gate(
    run_and_data: tuple[Path, Path], damage: str, fragment: str
) -> None:
    run, data = run_and_data
    fp16 = run / "export/student.fp16.onnx"
    if damage == "missing":
        fp16.unlink()
    elif damage == "tampered":
        _tamper(fp16)
    else:
        _malform(fp16, run)
    completed = run_reviewkd("validate", run, "--data", data)
    assert completed.returncode == 2, completed.stderr
    assert "cannot validate: onnxruntime/fp16:" in completed.stderr and fragment in completed.stderr
    # The other formats were still measured and the result kept.
    result = json.loads((run / "report/validate.json").read_text(encoding="utf-8"))
    assert result["results"]["onnxruntime/fp32"]["status"] == "ok"
    assert result["bad_files"] and result["bad_files"][0].startswith("onnxruntime/fp16:")
