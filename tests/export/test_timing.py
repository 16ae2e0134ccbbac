"""The export's timing table: stages recorded in order, never nested, adding up to the total."""

from __future__ import annotations

import time

import pytest

from deploy.manifest import SHARED_STAGE_FILE
from export.timing import StageTimer, timing_table


def _busy(seconds: float) -> None:
    """Spin until `seconds` of wall time AND of this process's CPU time have passed: on a loaded
    machine a wall-time loop alone may get a small share of a core (22% seen beside other jobs)."""
    wall_end, cpu_end = time.perf_counter() + seconds, time.process_time() + seconds
    while time.perf_counter() < wall_end or time.process_time() < cpu_end:
        pass


def test_stages_are_recorded_in_order_and_the_rows_add_up_to_the_total() -> None:
    timer = StageTimer()
    with timer.shared("read images"):
        _busy(0.02)
    _busy(0.01)  # between stages: the untimed row
    with timer.clock("export/student.onnx")("check"):
        _busy(0.03)
    block = timer.block()
    assert [(s["file"], s["stage"]) for s in block["stages"]] == [
        (SHARED_STAGE_FILE, "read images"),
        ("export/student.onnx", "check"),
    ]
    assert block["stages"][0]["wall_s"] >= 0.02 and block["stages"][1]["wall_s"] >= 0.03
    # A busy loop is CPU work on this thread: the stage's CPU time holds all of it.
    assert block["stages"][1]["cpu_s"] >= 0.03
    timed = sum(s["wall_s"] for s in block["stages"])
    assert block["untimed_wall_s"] == pytest.approx(block["total_wall_s"] - timed)
    assert block["untimed_wall_s"] >= 0.01
    table = timing_table(block).splitlines()
    assert table[0].split() == ["file", "stage", "wall", "s", "cpu", "s"]
    assert table[2].startswith("export/student.onnx  check")
    assert table[-1].split()[0] == "total" and float(table[-1].split()[1]) == pytest.approx(
        block["total_wall_s"], abs=0.005
    )


def test_a_stage_inside_a_stage_is_refused_and_a_failed_stage_is_not_recorded() -> None:
    timer = StageTimer()
    with (
        pytest.raises(RuntimeError, match="inside stage 'convert'"),
        timer.stage("a.onnx", "convert"),
        timer.stage("a.onnx", "check"),
    ):
        pass
    assert timer.stages == []
    with timer.stage("a.onnx", "check"):  # the refused nesting left no stage open
        pass
    assert [s["stage"] for s in timer.stages] == ["check"]
