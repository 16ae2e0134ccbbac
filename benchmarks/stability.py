"""Whether a latency measurement can be trusted, and whether one format is faster than another.

Pure statistics on per-call latencies (milliseconds), no runners: the steady-state rule that ends a
warm-up, bootstrap intervals on percentiles, the `stable`/`noisy` verdict, and the ratio of medians
of an interleaved (A B, B A, ...) comparison with its verdict. Every bootstrap draws from a generator
seeded with BOOTSTRAP_SEED, so the same samples always give the same intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Warm-up: the warm-up ends when the median of the last STEADY_WINDOW calls is within
# STEADY_TOLERANCE (relative) of the median of the STEADY_WINDOW calls before them, or at the cap.
# An even window: timings that alternate (fast, slow, fast, ...) give two windows the same median.
STEADY_WINDOW = 10
STEADY_TOLERANCE = 0.10
MAX_WARMUP_ITERS = 200
MAX_WARMUP_SECONDS = 10.0

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# Resamples drawn at once: 100 resamples of the 100,000 samples a measurement may hold is 80 MB.
_BOOTSTRAP_CHUNK = 100

# The stability verdict: `noisy` when any of these holds.
NOISY_CV = 0.10  # standard deviation above 10% of the mean
NOISY_TAIL_RATIO = 2.0  # p99 more than twice p50: calls preempted or throttled now and then
MIN_JUDGED_ITERS = 30  # fewer timed calls cannot show a p99 worth judging
NOISY_ADVICE = "lock clocks, stop other load, or give more time (--seconds)"

# The smallest difference a comparison claims: ratios of medians within 2% of 1 are "no difference"
# however narrow their interval. Two ONNX Runtime sessions of the same file differ by about 0.4% on
# this project's CPU, which thousands of pairs resolve (benchmarks/RESULTS.md, the A/A check): a real
# difference, but the sessions', not the files'.
MIN_CLAIMED_DIFFERENCE = 0.02

STABLE = "stable"
NOISY = "noisy"
FASTER = "faster"
SLOWER = "slower"
NO_DIFFERENCE = "no difference"


def is_steady(warmup_ms: Sequence[float]) -> bool:
    """True when the last two windows of warm-up timings have medians within STEADY_TOLERANCE."""
    if len(warmup_ms) < 2 * STEADY_WINDOW:
        return False
    latest = float(np.median(warmup_ms[-STEADY_WINDOW:]))
    before = float(np.median(warmup_ms[-2 * STEADY_WINDOW : -STEADY_WINDOW]))
    return abs(latest - before) <= STEADY_TOLERANCE * before


def _interval(values: np.ndarray) -> list[float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def percentile_intervals(
    samples_ms: Sequence[float] | np.ndarray, quantiles: Sequence[float]
) -> list[list[float]]:
    """Bootstrap 95% percentile intervals of each percentile in `quantiles` (0-100) of the samples:
    BOOTSTRAP_RESAMPLES resamples with replacement, seeded, so the result is deterministic."""
    samples = np.asarray(samples_ms, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    estimates = []
    for start in range(0, BOOTSTRAP_RESAMPLES, _BOOTSTRAP_CHUNK):
        count = min(_BOOTSTRAP_CHUNK, BOOTSTRAP_RESAMPLES - start)
        draws = samples[rng.integers(0, samples.size, size=(count, samples.size))]
        estimates.append(np.percentile(draws, quantiles, axis=1).T)
    table = np.concatenate(estimates)
    return [_interval(table[:, column]) for column in range(len(quantiles))]


def distribution(samples_ms: Sequence[float]) -> dict[str, Any]:
    """A series of timings (ms) summarised: p50/p90/p99 (linear interpolation, numpy's default), each
    with its bootstrap 95% interval ("p50_ci_ms" ...), mean, sample standard deviation (0 for one
    sample), CV (std / mean; None when the mean is 0), min, max and the count ("iters")."""
    samples = np.asarray(samples_ms, dtype=np.float64)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError("a distribution needs at least one sample")
    p50, p90, p99 = (float(v) for v in np.percentile(samples, [50, 90, 99]))
    p50_ci, p90_ci, p99_ci = percentile_intervals(samples, [50, 90, 99])
    mean = float(samples.mean())
    std = float(samples.std(ddof=1)) if samples.size > 1 else 0.0
    return {
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "p50_ci_ms": p50_ci,
        "p90_ci_ms": p90_ci,
        "p99_ci_ms": p99_ci,
        "mean_ms": mean,
        "std_ms": std,
        "cv": std / mean if mean > 0 else None,
        "min_ms": float(samples.min()),
        "max_ms": float(samples.max()),
        "iters": int(samples.size),
    }


def stability_verdict(
    iters: int,
    cv: float | None,
    p50_ms: float,
    p99_ms: float,
    warmup_steady: bool | None = None,
    machine_flags: Sequence[str] = (),
) -> tuple[str, str | None]:
    """(`stable` or `noisy`, why it is noisy with the advice, or None when stable).

    Noisy: fewer than MIN_JUDGED_ITERS timed calls, a coefficient of variation above NOISY_CV,
    p99/p50 above NOISY_TAIL_RATIO, a warm-up that hit its cap without reaching a steady state, or
    any of `machine_flags` (benchmarks.machine_state: other load, governor, throttling), which a
    quiet-looking distribution does not clear.
    """
    reasons = []
    if iters < MIN_JUDGED_ITERS:
        reasons.append(f"only {iters} timed calls (< {MIN_JUDGED_ITERS})")
    if cv is not None and cv > NOISY_CV:
        reasons.append(f"CV {cv:.2f} > {NOISY_CV:.2f}")
    if p50_ms > 0 and p99_ms / p50_ms > NOISY_TAIL_RATIO:
        reasons.append(f"p99/p50 {p99_ms / p50_ms:.1f} > {NOISY_TAIL_RATIO:g}")
    if warmup_steady is False:
        cap = f"{MAX_WARMUP_ITERS} calls or {MAX_WARMUP_SECONDS:g} s"
        reasons.append(f"no steady state within the warm-up cap ({cap})")
    reasons.extend(machine_flags)
    if not reasons:
        return STABLE, None
    return NOISY, f"{'; '.join(reasons)}: {NOISY_ADVICE}"


def _block_starts(rng: np.random.Generator, n: int, block: int, count: int) -> np.ndarray:
    """Indices of `count` moving-block resamples of 0..n-1: whole blocks of `block` consecutive
    indices, concatenated and cut to n."""
    blocks = -(-n // block)
    starts = rng.integers(0, n - block + 1, size=(count, blocks))
    indices = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(count, -1)
    return indices[:, :n]


def compare_medians(a_ms: Sequence[float], b_ms: Sequence[float]) -> dict[str, Any]:
    """The ratio median(A) / median(B) of interleaved paired timings, with a 95% interval and a
    verdict: `faster` (A's time is lower: the whole interval is below 1 - MIN_CLAIMED_DIFFERENCE),
    `slower` (the whole interval above 1 + MIN_CLAIMED_DIFFERENCE), else `no difference`.

    The interval is a moving-block bootstrap over the pairs (blocks of about n^(1/3) consecutive
    pairs, seeded): resampling pairs keeps a drift that moved both alike out of the ratio, and
    resampling blocks keeps the correlation of neighbouring calls (a busy spell lasts several calls),
    which resampling single pairs would ignore and so give too narrow an interval.
    """
    a = np.asarray(a_ms, dtype=np.float64)
    b = np.asarray(b_ms, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:
        raise ValueError("compare_medians needs two equally long series of at least 2 paired timings")
    median_b = float(np.median(b))
    if median_b <= 0 or float(np.median(a)) <= 0:
        raise ValueError("compare_medians needs positive medians (a clock too coarse to see the calls?)")
    n = a.size
    block = max(1, round(n ** (1 / 3)))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    ratios = []
    for start in range(0, BOOTSTRAP_RESAMPLES, _BOOTSTRAP_CHUNK):
        count = min(_BOOTSTRAP_CHUNK, BOOTSTRAP_RESAMPLES - start)
        rows = _block_starts(rng, n, block, count)
        ratios.append(np.median(a[rows], axis=1) / np.maximum(np.median(b[rows], axis=1), 1e-12))
    low, high = _interval(np.concatenate(ratios))
    ratio = float(np.median(a)) / median_b
    margin = MIN_CLAIMED_DIFFERENCE
    verdict = FASTER if high < 1 - margin else SLOWER if low > 1 + margin else NO_DIFFERENCE
    return {
        "pairs": int(n),
        "a_p50_ms": float(np.median(a)),
        "b_p50_ms": median_b,
        "time_ratio": ratio,
        "time_ratio_ci": [low, high],
        "verdict": verdict,
    }
