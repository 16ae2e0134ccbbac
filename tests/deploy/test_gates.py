"""The one gate table: parsing, checking and applying gates, as export and validate both use them."""

from __future__ import annotations

import math

import pytest

from deploy.errors import UsageError
from deploy.gates import (
    DEFAULT_GATES,
    DETECTION_GATES,
    GATE_METRICS,
    default_gates,
    evaluate_gates,
    gates_for,
    parse_gate,
    set_gate,
)
from deploy.tasks import CLASSIFICATION, DETECTION, TASKS


def test_precision_flavours_use_their_family_gates() -> None:
    assert gates_for(DEFAULT_GATES, "int8-trt") == DEFAULT_GATES["int8"]
    assert gates_for(DEFAULT_GATES, "fp16") == DEFAULT_GATES["fp16"]
    assert gates_for(DEFAULT_GATES, "bf16") == {}
    custom = {"int8-trt": {"min_top1": 50.0}, "int8": {"max_top1_drop": 1.0}}
    assert gates_for(custom, "int8-trt") == {"min_top1": 50.0}


def test_parse_gate_accepts_the_documented_forms_and_rejects_others() -> None:
    assert parse_gate("fp32:max_abs_diff=1e-3") == ("fp32", "max_abs_diff", 1e-3)
    assert parse_gate(" int8 : min_top1 = 90 ") == ("int8", "min_top1", 90.0)
    assert parse_gate("int8-trt:max_top1_drop=2") == ("int8-trt", "max_top1_drop", 2.0)
    assert parse_gate("fp32:min_agreement=off") == ("fp32", "min_agreement", None)
    gates = set_gate(default_gates(), "fp32", "min_agreement", None, "--gate")
    assert gates["fp32"] == {"max_abs_diff": 1e-4}
    assert DEFAULT_GATES["fp32"]["min_agreement"] == 100.0  # the defaults were copied, not changed
    for bad in (
        "fp32",
        "fp32:max_abs_diff",
        "fp32:speed=3",
        "fp32:max_abs_diff=abc",
        ":max_abs_diff=1",
        "fp32:min_top1=nan",
    ):
        with pytest.raises(UsageError, match="--gate"):
            parse_gate(bad)


@pytest.mark.parametrize("precision", ["in8", "INT8", "Fp16", "int 8", "float32", "8int"])
def test_an_unknown_precision_is_an_error_not_a_gate_that_never_applies(precision: str) -> None:
    # Issue 11 item 3: "in8" and "INT8" used to be stored under a key no format ever looks up.
    with pytest.raises(UsageError, match=f"unknown precision {precision!r}"):
        parse_gate(f"{precision}:max_top1_drop=0")
    with pytest.raises(UsageError, match="unknown precision"):
        set_gate(default_gates(), precision, "max_top1_drop", 0.0, "--gate")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_abs_diff", -1.0),
        ("max_mean_abs_diff", -1e-9),
        ("min_agreement", 150.0),
        ("min_agreement", -1.0),
        ("min_top1", 200.0),
        ("max_top1_drop", -0.5),
        ("max_top1_drop", 101.0),
        ("max_abs_diff", math.inf),
        ("min_top1", math.nan),
    ],
)
def test_impossible_or_non_finite_thresholds_are_refused_when_set(name: str, value: float) -> None:
    with pytest.raises(UsageError, match="--max-abs-diff-fp32"):
        set_gate(default_gates(), "fp32", name, value, "--max-abs-diff-fp32")
    with pytest.raises(UsageError, match="--gate"):
        parse_gate(f"fp32:{name}={value}")


def test_thresholds_at_the_edges_of_their_range_are_accepted() -> None:
    for name, metric in GATE_METRICS.items():
        edges = [metric.lowest] + ([] if math.isinf(metric.highest) else [metric.highest])
        for edge in edges:
            assert parse_gate(f"fp16:{name}={edge}") == ("fp16", name, edge)


def test_evaluate_gates_reads_each_direction_and_fails_what_was_not_measured() -> None:
    measurement = {
        "parity": {"max_abs_diff": 2e-4, "mean_abs_diff": 1e-5, "top1_agreement": 99.5},
        "accuracy": {"top1": 90.0, "top1_drop": None},
    }
    gates = {"max_abs_diff": 1e-4, "min_agreement": 99.0, "max_top1_drop": 1.0, "min_top1": 90.0}
    verdicts = {c["gate"]: c["passed"] for c in evaluate_gates(measurement, gates)}
    expected = {"max_abs_diff": False, "min_agreement": True, "max_top1_drop": False, "min_top1": True}
    assert verdicts == expected
    nan = {"parity": {"max_abs_diff": math.nan}}
    assert evaluate_gates(nan, {"max_abs_diff": 1.0})[0]["passed"] is False


@pytest.mark.parametrize(
    ("interval", "verdict", "passed"),
    [([-0.4, 0.8], "ok", True), ([1.2, 2.5], "failed", False), ([0.3, 1.6], "inconclusive", True)],
)
def test_a_map_drop_is_judged_on_its_bootstrap_interval(
    interval: list[float], verdict: str, passed: bool
) -> None:
    # the point estimate alone (0.2) would pass every row: the interval decides
    measurement = {"accuracy": {"map_drop": 0.2, "map_drop_interval": interval}}
    (check,) = evaluate_gates(measurement, DETECTION_GATES["int8"])
    assert (check["verdict"], check["passed"], check["interval"]) == (verdict, passed, interval)
    (strict,) = evaluate_gates(measurement, DETECTION_GATES["int8"], inconclusive_passes=False)
    assert strict["passed"] == (verdict == "ok")


def test_each_task_hands_out_its_own_gates() -> None:
    assert TASKS[DETECTION].gates["fp32"] == {"min_box_parity": 99.0}
    assert TASKS[CLASSIFICATION].gates is DEFAULT_GATES
    (check,) = evaluate_gates({"parity": {"box_matched": 98.9}}, TASKS[DETECTION].gates["fp32"])
    assert not check["passed"] and "verdict" not in check
