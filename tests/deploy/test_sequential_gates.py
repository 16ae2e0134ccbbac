"""Sequential gates (issue 23): the schedule of looks and a simulation of its error rates.

The simulation draws the paired outcomes of many checks of 10,000 images at a known true drop and
runs each through the decision a sequential check takes (deploy.gates: the looks, evaluate_gates
on each look's interval, stop when `resolved`). The stated coverage (95%) and the verdicts' error
rates (a wrong verdict: "ok" while the true drop exceeds the budget, "failed" while it does not;
at most 5% together) must hold within Monte Carlo error; the same looks taken at 95% each, the
tempting shortcut, must not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from deploy.errors import UsageError
from deploy.gates import (
    INTERIM_ALPHA_SHARE,
    MIN_FIRST_LOOK,
    Look,
    evaluate_gates,
    resolved,
    sequential_looks,
)
from deploy.paired_stats import PairedComparison
from deploy.status import Status

TRIALS = 4000
BUDGET_POINTS = 1.0
STATED_ERROR = 0.05
# Three Monte Carlo standard errors of a 5% rate over TRIALS checks.
TOLERANCE = 3 * math.sqrt(STATED_ERROR * (1 - STATED_ERROR) / TRIALS)


def test_looks_split_the_error_in_advance_and_end_on_every_image() -> None:
    looks = sequential_looks(10_000)
    assert [look.images for look in looks] == [1250, 2500, 5000, 10_000]
    errors = [1 - look.confidence for look in looks]
    assert math.isclose(sum(errors), 0.05)
    assert math.isclose(errors[-1], 0.05 * (1 - INTERIM_ALPHA_SHARE))
    # Looks under MIN_FIRST_LOOK images are not taken; a small check has its one 95% look.
    assert [look.images for look in sequential_looks(3000)] == [750, 1500, 3000]
    assert sequential_looks(2 * MIN_FIRST_LOOK - 1) == [Look(2 * MIN_FIRST_LOOK - 1, 0.95)]
    assert sequential_looks(10) == [Look(10, 0.95)]
    with pytest.raises(UsageError, match="at least one image"):
        sequential_looks(0)


def test_a_look_confidence_travels_with_the_counts_and_is_checked() -> None:
    comparison = PairedComparison(2000, 1900, 1890, 30, 20, 0.99)
    counts = {**comparison.counts(), "confidence": 0.99}
    assert PairedComparison.from_counts(counts) == comparison
    for bad in (1.5, 0.0, "high"):
        with pytest.raises(UsageError, match=r"confidence|expected"):
            PairedComparison.from_counts({**counts, "confidence": bad})


def _measurement(comparison: PairedComparison) -> dict[str, Any]:
    counts = {**comparison.counts(), "confidence": comparison.confidence}
    return {"accuracy": {"top1_drop": 100 * comparison.drop, "paired": counts}}


def simulate(looks: list[Look], p_loss: float, p_gain: float, seed: int = 0) -> dict[str, float]:
    """Rates over TRIALS sequential checks: each verdict, the coverage of the interval the check
    stopped with, and the mean images used."""
    rng = np.random.default_rng(seed)
    steps = np.diff([0] + [look.images for look in looks])
    draws = [rng.multinomial(step, [p_loss, p_gain, 1 - p_loss - p_gain], size=TRIALS) for step in steps]
    cumulative = np.cumsum(np.stack(draws, axis=1), axis=1)  # trial, look, (losses, gains, neither)
    true_drop = p_loss - p_gain
    tally = {Status.OK: 0, Status.FAILED: 0, Status.INCONCLUSIVE: 0, "covered": 0, "images": 0}
    for trial in cumulative:
        for look, (losses, gains, _) in zip(looks, trial, strict=True):
            # The reference is wrong exactly on the gains: only the discordant counts move the interval.
            n, lost, gained = look.images, int(losses), int(gains)
            comparison = PairedComparison(n, n - gained, n - lost, lost, gained, look.confidence)
            (check,) = evaluate_gates(_measurement(comparison), {"max_top1_drop": BUDGET_POINTS})
            if resolved([check]):
                break
        low, high = comparison.interval
        tally[check["verdict"]] += 1
        tally["covered"] += low <= true_drop <= high
        tally["images"] += look.images
    return {str(key): count / TRIALS for key, count in tally.items()}


def wrong_verdicts(rates: dict[str, float], p_loss: float, p_gain: float) -> float:
    """The rate of verdicts that contradict the true drop."""
    within = 100 * (p_loss - p_gain) <= BUDGET_POINTS
    return rates["failed"] if within else rates["ok"]


# (losses, gains) rates: at the budget, just over it, a file well within it, one well over it.
SCENARIOS = [(0.015, 0.005), (0.0151, 0.005), (0.007, 0.007), (0.02, 0.005)]


@pytest.mark.parametrize(("p_loss", "p_gain"), SCENARIOS)
def test_early_stop_keeps_the_stated_coverage_and_error_rates(p_loss: float, p_gain: float) -> None:
    rates = simulate(sequential_looks(10_000), p_loss, p_gain)
    assert rates["covered"] >= 1 - STATED_ERROR - TOLERANCE
    assert wrong_verdicts(rates, p_loss, p_gain) <= STATED_ERROR / 2 + TOLERANCE


def test_looking_at_95_percent_each_time_breaks_the_error_rates() -> None:
    """The simulation can fail: the same looks without the split error miss the true drop too often."""
    naive = [Look(look.images, 0.95) for look in sequential_looks(10_000)]
    p_loss, p_gain = SCENARIOS[0]
    rates = simulate(naive, p_loss, p_gain)
    assert rates["covered"] < 1 - STATED_ERROR - TOLERANCE
    assert wrong_verdicts(rates, p_loss, p_gain) > STATED_ERROR / 2 + TOLERANCE


def test_a_clear_file_stops_early_and_a_borderline_one_uses_every_image() -> None:
    clear = simulate(sequential_looks(10_000), 0.007, 0.007)
    assert clear["ok"] == 1.0
    assert clear["images"] < 2600  # mostly the first or second look, not 10,000
    borderline = simulate(sequential_looks(10_000), 0.015, 0.005)
    assert borderline["images"] > 9500


# fp16's gate: top-1 agreement with fp32 of at least 99%.
AGREEMENT_MINIMUM = 99.0


def simulate_agreement(looks: list[Look], p_disagree: float, stop_on_point: bool = False) -> dict[str, float]:
    """Rates over TRIALS sequential agreement checks: passed, stopped early, and the mean images
    used. Interim looks are judged as export's check judges them (`interim_confidence`), the last on
    the point estimate; `stop_on_point` is the shortcut of stopping at any look whose point estimate
    meets the minimum."""
    rng = np.random.default_rng(1)
    steps = np.diff([0] + [look.images for look in looks])
    draws = np.stack([rng.binomial(step, p_disagree, TRIALS) for step in steps], axis=1)
    disagreements = np.cumsum(draws, axis=1)  # trial, look
    tally = {"passed": 0, "early": 0, "images": 0}
    for trial in disagreements:
        for taken, (look, missed) in enumerate(zip(looks, trial, strict=True), start=1):
            last = taken == len(looks)
            parity = {"n": look.images, "top1_agreement": 100 * (look.images - int(missed)) / look.images}
            interim = None if last or stop_on_point else look.confidence
            (check,) = evaluate_gates(
                {"parity": parity}, {"min_agreement": AGREEMENT_MINIMUM}, interim_confidence=interim
            )
            if last or resolved([check]) or (stop_on_point and check["passed"]):
                break
        tally["passed"] += check["passed"]
        tally["early"] += not last
        tally["images"] += look.images
    return {key: count / TRIALS for key, count in tally.items()}


def test_an_agreement_gate_stops_early_only_when_its_interval_clears_the_minimum() -> None:
    looks = sequential_looks(10_000)
    fixed = [looks[-1]]
    # A file under the minimum: stopping early adds at most the interim looks' error (1%) to the
    # chance that it passes, against a fixed-size check of every image.
    for p_disagree in (0.0101, 0.0105, 0.012):
        sequential, one_look = simulate_agreement(looks, p_disagree), simulate_agreement(fixed, p_disagree)
        assert sequential["passed"] <= one_look["passed"] + 0.05 * INTERIM_ALPHA_SHARE + TOLERANCE
    # A typical fp16 file (the ResNet-56's agrees on 99.96%) settles early, nearly always at the
    # first look (1,250 of 10,000 images).
    typical = simulate_agreement(looks, 0.0004)
    assert typical["passed"] == 1.0 and typical["early"] == 1.0
    assert typical["images"] < 1.05 * looks[0].images


def test_stopping_on_the_agreement_point_estimate_passes_files_under_the_minimum() -> None:
    """The shortcut the interval prevents: a file just under 99% passes far more often."""
    looks = sequential_looks(10_000)
    shortcut = simulate_agreement(looks, 0.0101, stop_on_point=True)
    one_look = simulate_agreement([looks[-1]], 0.0101)
    assert shortcut["passed"] > one_look["passed"] + 0.05 * INTERIM_ALPHA_SHARE + TOLERANCE
