"""`reviewkd validate` exit codes: 1 is a gate that failed, and only that.

Issue 11 items 3, 15 and 16: a gate naming an unknown precision, an impossible or non-finite
threshold, and a missing, tampered or malformed file are bad input: exit 2, with one line naming
the option or the file; a gate that fails on good files is exit 1.
"""

from __future__ import annotations

import json
import re
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


def test_bench_prints_each_measurements_intervals_and_verdict(
    run_and_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = run_and_data
    argv = ["bench", str(run), "--backends", "onnxruntime/fp32", "--batch-sizes", "1", "--iters", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    line = next(text for text in out.splitlines() if text.startswith("onnxruntime/fp32"))
    assert re.search(r"p50 [0-9.]+ ms \[[0-9.]+-[0-9.]+\]", line) and "n 5" in line and "warm-up " in line
    assert line.endswith("noisy") and "noisy: only 5 timed calls (< 30)" in out
    assert re.search(r"other load (\d+%|unknown \(.+\)) ", line) and "CPU: governor " in out
    assert "lock clocks, stop other load, or give more time" in out
    saved = json.loads((run / "report" / "bench.json").read_text())
    stats = saved["results"]["onnxruntime/fp32"]["latency"]["1"]
    assert stats["verdict"] == "noisy" and stats["warmup_iters"] >= 20 and len(stats["p99_ci_ms"]) == 2


def test_bench_compare_times_two_formats_interleaved_and_records_the_ratio(
    run_and_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = run_and_data
    fp16 = ["--backends", "onnxruntime/fp16", "--batch-sizes", "1", "--iters", "3"]
    assert main(["bench", str(run), *fp16]) == 0
    pair = "onnxruntime/fp32,onnxruntime/fp16"
    argv = ["bench", str(run), "--compare", pair, "--batch-sizes", "1,2", "--iters", "40", "--warmup", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for batch in ("1", "2"):
        assert re.search(
            rf"onnxruntime/fp32 vs onnxruntime/fp16 batch {batch}: .*\(time ratio A/B [0-9.]+, 95% CI"
            r" [0-9.]+-[0-9.]+, 40 pairs\)",
            out,
        ), out
    saved = json.loads((run / "report" / "bench.json").read_text())
    comparison = saved["comparisons"][pair]
    assert comparison["status"] == "ok" and set(comparison["batches"]) == {"1", "2"}
    paired = comparison["batches"]["1"]
    low, high = paired["time_ratio_ci"]
    assert low <= paired["time_ratio"] <= high
    assert paired["verdict"] in ("faster", "slower", "no difference")
    assert "onnxruntime/fp16" in saved["results"]  # the earlier bench stays beside the comparison
    assert comparison["machine"] == saved["results"]["onnxruntime/fp16"]["machine"]


@pytest.mark.parametrize(
    ("compare", "fragment"),
    [
        ("onnxruntime/fp32", "--compare 'onnxruntime/fp32': expected two format keys A,B"),
        ("onnxruntime/fp32,tensorrt/int8", "--compare: tensorrt/int8 is not a format of"),
    ],
)
def test_a_bad_compare_is_exit_2(
    run_and_data: tuple[Path, Path], compare: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = run_and_data
    assert main(["bench", str(run), "--compare", compare, "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err
    assert not (run / "report" / "bench.json").exists()


def test_compare_with_backends_is_exit_2(
    run_and_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = run_and_data
    argv = ["bench", str(run), "--compare", "onnxruntime/fp32,onnxruntime/fp16", "--backends", "onnxruntime"]
    assert main(argv) == 2
    assert "give either --compare or --backends, not both" in capsys.readouterr().err
