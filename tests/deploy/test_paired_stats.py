"""The paired top-1 interval against hand computations, and the gate's three verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deploy.errors import UsageError
from deploy.paired_stats import (
    compare_correct,
    compare_predictions,
    judge_agreement,
    judge_drop,
    proportion_interval,
)


def _pairs(both: int, losses: int, gains: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness vectors with a known 2x2 table, shuffled so that order cannot matter."""
    ref = [True] * both + [True] * losses + [False] * gains + [False] * neither
    cand = [True] * both + [False] * losses + [True] * gains + [False] * neither
    order = np.random.default_rng(0).permutation(len(ref))
    return np.array(ref)[order], np.array(cand)[order]


def test_interval_matches_a_hand_computation() -> None:
    # b = 10 losses, c = 4 gains of n = 1000. Agresti-Min: drop (10 - 4) / 1002 = 0.005988;
    # variance (15 / 1002 - 0.005988**2) / 1002 = 1.49044e-5, standard error 0.0038606;
    # 1.95996 * 0.0038606 = 0.0075666 either side: [-0.0015787, 0.0135547].
    comparison = compare_correct(*_pairs(880, 10, 4, 106))
    assert (comparison.n, comparison.losses, comparison.gains) == (1000, 10, 4)
    assert comparison.reference_top1 == pytest.approx(0.890)
    assert comparison.candidate_top1 == pytest.approx(0.884)
    assert comparison.drop == pytest.approx(0.006)
    low, high = comparison.interval
    assert low == pytest.approx(-0.0015787, abs=1e-6)
    assert high == pytest.approx(0.0135547, abs=1e-6)


def test_only_discordant_pairs_move_the_interval() -> None:
    a = compare_correct(*_pairs(500, 10, 4, 486))
    b = compare_correct(*_pairs(900, 10, 4, 86))
    assert a.interval == b.interval


def test_no_discordant_pair_still_has_width() -> None:
    comparison = compare_correct(*_pairs(50, 0, 0, 10))
    low, high = comparison.interval
    # 60 images, none discordant: centre 0, variance (1 / 62) / 62, standard error 1 / 62.
    assert high == pytest.approx(1.959964 / 62, abs=1e-6) and low == pytest.approx(-high)


def test_gate_passes_fails_and_is_inconclusive() -> None:
    ok = judge_drop(compare_correct(*_pairs(9000, 5, 5, 990)), 0.3)
    assert ok.status == "ok" and "within the 0.3-point budget" in ok.reason
    failed = judge_drop(compare_correct(*_pairs(9000, 200, 10, 790)), 1.0)
    assert failed.status == "failed" and "significantly more than the 1-point budget" in failed.reason


def test_small_sample_is_inconclusive_and_says_how_many_images_would_resolve_it() -> None:
    # 360 images, 3 losses, 1 gain, budget 0.3 points: centre 2 / 362 = 0.5525 points, interval
    # [-0.657, 1.762] points straddles 0.3. Images needed: 1.95996**2 * (5/362 - (2/362)**2)
    # / (0.003 - 2/362)**2 - 2, rounded up = 8303.
    verdict = judge_drop(compare_correct(*_pairs(320, 3, 1, 36)), 0.3)
    assert verdict.status == "inconclusive"
    assert verdict.reason.startswith("inconclusive: 360 images cannot resolve a 0.3-point budget")
    assert verdict.images_needed == 8303
    assert "about 8,303 would" in verdict.reason


def test_images_needed_does_resolve_the_budget() -> None:
    small = compare_correct(*_pairs(900, 8, 2, 90))
    needed = small.images_to_resolve(0.01)
    assert needed is not None
    scale = needed / small.n
    big = compare_correct(
        *_pairs(math.ceil(900 * scale), math.ceil(8 * scale), math.ceil(2 * scale), math.ceil(90 * scale))
    )
    assert judge_drop(big, 1.0).status != "inconclusive"


def test_predictions_are_paired_against_labels() -> None:
    labels = np.array([0, 1, 2, 3])
    comparison = compare_predictions(labels, np.array([0, 1, 2, 0]), np.array([0, 1, 0, 3]))
    assert (comparison.losses, comparison.gains, comparison.n) == (1, 1, 4)


def test_bad_input_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="same images"):
        compare_correct(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(UsageError, match="at least one image"):
        compare_correct(np.ones(0, bool), np.ones(0, bool))
    with pytest.raises(UsageError, match="budget"):
        judge_drop(compare_correct(np.ones(3, bool), np.ones(3, bool)), -1)


def _measurement(both: int, losses: int, gains: int, neither: int) -> dict[str, object]:
    comparison = compare_correct(*_pairs(both, losses, gains, neither))
    return {"accuracy": {"top1_drop": 100 * comparison.drop, "paired": comparison.counts()}}


def test_the_top1_drop_gate_judges_the_interval() -> None:
    from deploy.gates import describe_check, evaluate_gates

    gate = {"max_top1_drop": 1.0}
    # 0.8-point drop on 360 images: under the budget as a point estimate, but not resolved.
    (small,) = evaluate_gates(_measurement(320, 4, 1, 35), gate)
    assert small["verdict"] == "inconclusive" and small["passed"]
    assert describe_check(small).startswith("gate max_top1_drop: inconclusive: 360 images cannot resolve")
    (strict,) = evaluate_gates(_measurement(320, 4, 1, 35), gate, inconclusive_passes=False)
    assert not strict["passed"] and strict["images_needed"] > 360
    # 1.2-point drop on 20,000 images: above the budget, and the interval says so.
    (large,) = evaluate_gates(_measurement(18000, 300, 60, 1640), gate)
    assert large["verdict"] == "failed" and not large["passed"] and large["interval"][0] > 1.0
    # A 1.5-point point estimate on 40 images fails nothing it cannot show.
    (tiny,) = evaluate_gates(_measurement(36, 1, 0, 3), gate)
    assert tiny["verdict"] == "inconclusive"
    (unpaired,) = evaluate_gates({"accuracy": {"top1_drop": 1.5}}, gate)
    assert "verdict" not in unpaired and not unpaired["passed"]


def test_counts_round_trip_and_inconsistent_counts_are_refused() -> None:
    from deploy.paired_stats import PairedComparison

    comparison = compare_correct(*_pairs(880, 10, 4, 106))
    assert PairedComparison.from_counts(comparison.counts()) == comparison
    with pytest.raises(UsageError, match="inconsistent"):
        PairedComparison.from_counts({**comparison.counts(), "candidate_correct": 1})


def test_the_wilson_interval_keeps_a_width_at_the_ends_and_stays_in_range() -> None:
    # The textbook value: 0 of 10 gives [0, 0.2775] at 95%.
    low, high = proportion_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2775, abs=1e-4)
    low, high = proportion_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.2775, abs=1e-4)
    low, high = proportion_interval(63, 64)
    assert low < 63 / 64 < high < 1
    with pytest.raises(UsageError):
        proportion_interval(3, 0)


@pytest.mark.parametrize(
    ("agreed", "n", "minimum", "status"),
    [
        (63, 64, 99.0, "inconclusive"),  # one flipped near-tie of 64 random inputs
        (64, 64, 99.0, "ok"),
        (64, 64, 100.0, "ok"),
        (63, 64, 100.0, "failed"),  # fp32's 100%: any flip is below it, significantly
        (55, 64, 99.0, "failed"),
        (990, 1000, 99.0, "ok"),
        (985, 1000, 99.0, "inconclusive"),
    ],
)
def test_an_agreement_short_of_its_minimum_fails_only_when_significant(
    agreed: int, n: int, minimum: float, status: str
) -> None:
    verdict = judge_agreement(agreed, n, minimum)
    assert verdict.status == status, verdict.reason
    if status == "inconclusive":
        expected = f"inconclusive: {n:,} inputs cannot resolve a {minimum:g}% agreement minimum"
        assert verdict.reason.startswith(expected)
