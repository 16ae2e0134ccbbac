"""benchmarks.scripts.aa_compare: the A/A check's record, on a tiny run's real ONNX Runtime file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.scripts.aa_compare import main
from deploy.errors import UsageError
from tests.helpers import make_run


def test_the_aa_check_records_every_repetition_and_the_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = make_run(tmp_path)
    out = tmp_path / "aa.json"
    assert main([str(run), "--repeats", "3", "--seconds", "0.02", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["format"] == "onnxruntime/fp32" and record["repeats"] == 3
    assert len(record["repetitions"]) == 3
    claimed = sum(r["verdict"] != "no difference" for r in record["repetitions"])
    assert record["false_differences"] == claimed
    assert record["false_difference_rate"] == pytest.approx(claimed / 3)
    assert record["met"] == (claimed / 3 <= 0.05)
    low, high = record["repetitions"][0]["time_ratio_ci"]
    assert low <= record["repetitions"][0]["time_ratio"] <= high
    assert "against itself, 3 repetitions" in capsys.readouterr().out


def test_a_format_the_run_lacks_is_named(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    with pytest.raises(UsageError, match="--format tensorrt/fp16: not a format of"):
        main([str(run), "--format", "tensorrt/fp16", "--repeats", "1", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
