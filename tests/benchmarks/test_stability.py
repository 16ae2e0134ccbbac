"""benchmarks.stability and the interleaved comparison: statistics on synthetic timings.

Synthetic samples are drawn from seeded generators, so every verdict here is deterministic; the
interleaved comparison of real runners runs on a fake clock.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.latency import (
    PerfCounterTimer,
    compare_targets,
    comparison_text,
    latency_stats,
    parse_compare,
)
from benchmarks.stability import (
    MIN_CLAIMED_DIFFERENCE,
    NOISY_ADVICE,
    compare_medians,
    is_steady,
    percentile_intervals,
    stability_verdict,
)
from benchmarks.targets import Target
from deploy.errors import UsageError
from deploy.runners.base import Runner
from tests.benchmarks.test_latency import FakeClock, TimedRunner


def _quiet(n: int = 2000, seed: int = 0) -> np.ndarray:
    """Latencies around 5 ms with a 2% spread: a machine doing nothing else."""
    return 5.0 * (1 + 0.02 * np.random.default_rng(seed).standard_normal(n))


def _preempted(n: int = 2000, seed: int = 0) -> np.ndarray:
    """The quiet latencies with 3% of the calls held up by 20 ms, as when another process takes the core."""
    samples = _quiet(n, seed)
    hit = np.random.default_rng(seed + 1).random(n) < 0.03
    return samples + 20.0 * hit


def test_percentile_intervals_are_seeded_and_cover_the_percentile() -> None:
    samples = _quiet()
    intervals = percentile_intervals(samples, [50, 90, 99])
    assert intervals == percentile_intervals(samples, [50, 90, 99])  # deterministic
    for (low, high), q in zip(intervals, (50, 90, 99), strict=True):
        assert low <= np.percentile(samples, q) <= high
    # The interval narrows as the samples grow: 2000 samples pin p50 to about +-0.5%.
    low, high = intervals[0]
    assert high - low < 0.01 * 5.0
    wide_low, wide_high = percentile_intervals(samples[:50], [50])[0]
    assert wide_high - wide_low > high - low


def test_latency_stats_record_cv_intervals_and_verdict() -> None:
    stats = latency_stats(list(_quiet()), batch_size=4)
    assert stats["cv"] == pytest.approx(stats["std_ms"] / stats["mean_ms"])
    assert stats["cv"] == pytest.approx(0.02, abs=0.002)
    assert stats["p99_ci_ms"][0] <= stats["p99_ms"] <= stats["p99_ci_ms"][1]
    assert (stats["verdict"], stats["noisy_because"]) == ("stable", None)


def test_a_preempted_sample_is_noisy_and_says_what_to_do() -> None:
    stats = latency_stats(list(_preempted()), batch_size=1)
    assert stats["verdict"] == "noisy"
    assert "p99/p50" in stats["noisy_because"] and "CV" in stats["noisy_because"]
    assert stats["noisy_because"].endswith(NOISY_ADVICE)
    assert "lock clocks, stop other load, or give more time" in NOISY_ADVICE


@pytest.mark.parametrize(
    ("iters", "cv", "p50", "p99", "steady", "reason"),
    [
        (100, 0.05, 1.0, 1.5, True, None),
        (100, 0.05, 1.0, 1.5, None, None),  # no warm-up asked for: nothing to hold against it
        (100, 0.15, 1.0, 1.5, True, "CV 0.15 > 0.10"),
        (100, 0.05, 1.0, 2.5, True, "p99/p50 2.5 > 2"),
        (29, 0.05, 1.0, 1.5, True, "only 29 timed calls (< 30)"),
        (100, 0.05, 1.0, 1.5, False, "no steady state within the warm-up cap"),
        (100, None, 0.0, 0.0, True, None),  # a clock too coarse to see the calls: no ratio to judge
    ],
)
def test_the_stability_thresholds(
    iters: int, cv: float | None, p50: float, p99: float, steady: bool | None, reason: str | None
) -> None:
    verdict, why = stability_verdict(iters, cv, p50, p99, steady)
    if reason is None:
        assert (verdict, why) == ("stable", None)
    else:
        assert verdict == "noisy" and why is not None and why.startswith(reason)


def test_a_quiet_distribution_on_an_undermining_machine_is_noisy() -> None:
    flag = "CPU governor powersave, not performance: the frequency may change between calls"
    stats = latency_stats(list(_quiet()), batch_size=4, machine_flags=[flag])
    assert stats["verdict"] == "noisy" and stats["noisy_because"] == f"{flag}: {NOISY_ADVICE}"


def test_steady_state_needs_two_agreeing_windows() -> None:
    assert not is_steady([1.0] * 19)
    assert is_steady([1.0] * 20)
    assert is_steady([1.0, 2.0] * 10)  # alternating calls: both windows have a median of 1.5
    assert not is_steady([2.0] * 10 + [1.0] * 10)
    assert is_steady([1.0] * 10 + [1.09] * 10) and not is_steady([1.0] * 10 + [1.11] * 10)


def test_compare_medians_a_faster_than_b() -> None:
    rng = np.random.default_rng(3)
    b = 5.0 * (1 + 0.05 * rng.standard_normal(300))
    a = 0.8 * 5.0 * (1 + 0.05 * rng.standard_normal(300))
    result = compare_medians(a, b)
    low, high = result["time_ratio_ci"]
    assert result["verdict"] == "faster" and result["pairs"] == 300
    assert low <= result["time_ratio"] <= high < 1
    assert result["time_ratio"] == pytest.approx(0.8, abs=0.02)
    assert compare_medians(b, a)["verdict"] == "slower"
    assert compare_medians(a, b) == result  # the bootstrap is seeded


def test_compare_medians_a_equal_to_b_finds_no_difference() -> None:
    """A and B from the same distribution: over 40 seeds, at most a few claim a difference (the
    interval is 95%), and a drift that moves both alike does not make one."""
    claims = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        drift = np.linspace(1.0, 1.5, 200)  # the machine slows down during the measurement
        a = 5.0 * drift * (1 + 0.05 * rng.standard_normal(200))
        b = 5.0 * drift * (1 + 0.05 * rng.standard_normal(200))
        result = compare_medians(a, b)
        low, high = result["time_ratio_ci"]
        assert low <= 1.0 + 0.1 and high >= 1.0 - 0.1
        claims += result["verdict"] != "no difference"
    assert claims <= 4


def test_compare_medians_rejects_series_it_cannot_compare() -> None:
    with pytest.raises(ValueError, match="equally long"):
        compare_medians([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive medians"):
        compare_medians([0.0, 0.0], [1.0, 1.0])


def test_compare_targets_interleaves_the_two_formats() -> None:
    clock = FakeClock()
    order: list[str] = []

    class Logged(TimedRunner):
        def __init__(self, name: str, duration_ms: float) -> None:
            super().__init__(clock, [duration_ms])
            self.label = name

        def _infer(self, images: np.ndarray) -> np.ndarray:
            order.append(self.label)
            return super()._infer(images)

    def fake_timer(runner: Runner) -> PerfCounterTimer:
        return PerfCounterTimer(clock)

    fast = Target("onnxruntime/int8", "int8", lambda: Logged("A", 1.0))
    slow = Target("onnxruntime/fp32", "fp32", lambda: Logged("B", 2.0))
    entry = compare_targets(fast, slow, (1, 4), warmup=0, iters=50, timer_factory=fake_timer)
    assert entry["status"] == "ok", entry["reason"]
    assert set(entry["batches"]) == {"1", "4"}
    # 50 pairs at each of two batch sizes, every other pair B first, so that neither format always
    # runs first in its pair.
    assert order == ["A", "B", "B", "A"] * 50
    paired = entry["batches"]["1"]
    assert paired["verdict"] == "faster" and paired["time_ratio"] == pytest.approx(0.5)
    assert paired["time_ratio_ci"] == pytest.approx([0.5, 0.5])
    assert comparison_text(entry, "1").startswith(
        "onnxruntime/int8 vs onnxruntime/fp32 batch 1: onnxruntime/int8 is 2.00x faster (time ratio A/B 0.500"
    )


def test_compare_targets_warms_each_format_up_and_reports_what_cannot_open() -> None:
    clock = FakeClock()

    def fake_timer(runner: Runner) -> PerfCounterTimer:
        return PerfCounterTimer(clock)

    same = Target("onnxruntime/fp32", "fp32", lambda: TimedRunner(clock, [1.0]))
    entry = compare_targets(same, same, (1,), warmup=1, iters=40, timer_factory=fake_timer)
    paired = entry["batches"]["1"]
    assert (paired["a_warmup_iters"], paired["b_warmup_iters"]) == (20, 20)
    assert paired["verdict"] == "no difference"
    assert "no difference" in comparison_text(entry, "1")

    def broken() -> Runner:
        raise RuntimeError("no such provider")

    failed = compare_targets(same, Target("x/int8", "int8", broken), (1,), iters=2, timer_factory=fake_timer)
    assert failed["status"] == "failed" and failed["reason"] == "x/int8: RuntimeError: no such provider"


def test_parse_compare() -> None:
    assert parse_compare("onnxruntime/fp32,onnxruntime/int8") == ("onnxruntime/fp32", "onnxruntime/int8")
    for bad in ("onnxruntime/fp32", "a,b,c", ",b", ""):
        with pytest.raises(UsageError, match="--compare"):
            parse_compare(bad)


def test_a_difference_below_the_smallest_claimed_is_no_difference() -> None:
    """Two sessions of one file differ by a fraction of a percent, which thousands of pairs resolve
    (benchmarks/RESULTS.md, the A/A check): within MIN_CLAIMED_DIFFERENCE it is not claimed."""
    rng = np.random.default_rng(5)
    b = 5.0 * (1 + 0.01 * rng.standard_normal(5000))
    a = 1.01 * 5.0 * (1 + 0.01 * rng.standard_normal(5000))
    result = compare_medians(a, b)
    assert result["time_ratio_ci"][0] > 1  # the interval excludes 1 ...
    assert result["verdict"] == "no difference"  # ... but 1% is below the 2% worth claiming
    assert MIN_CLAIMED_DIFFERENCE == 0.02
    assert compare_medians(1.03 / 1.01 * a, b)["verdict"] == "slower"
