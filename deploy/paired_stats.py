"""Paired accuracy comparison of two formats of one model on the same images, with an interval.

Two files run on the same N labelled images; each image is a pair (reference right?, candidate
right?). Only the discordant pairs carry information about the difference: `losses` (reference
right, candidate wrong) and `gains` (the other way round). The top-1 drop is (losses - gains) / N.

Interval: the Agresti-Min adjusted Wald interval for a difference of paired proportions (Agresti
and Min, Biometrics 2005): add 0.5 to each of the four cells of the 2x2 table, then

    drop = (b - c) / (N + 2),   var = ((b + c + 1) - (b - c)**2 / (N + 2)) / (N + 2)**2

with b = losses, c = gains. Unlike the plain McNemar/Wald interval it does not collapse to a
width of zero when no pair is discordant, so 50 images that agree are not proof of a 0.0-point loss.

A gate with a budget of B points asks whether the drop is within B:
- "failed": the whole interval lies above B (the loss is significantly worse than the budget);
- "ok": the whole interval lies at or below B;
- "inconclusive": the interval straddles B; the verdict says how many images would resolve it
  at the observed rates. Whether inconclusive passes is the caller's choice.

Pure numpy and the standard library: validate runs on edge devices without torch or scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from deploy.errors import UsageError
from deploy.status import Status

DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedComparison:
    """Accuracy of a candidate against a reference on the same images; rates are fractions."""

    n: int
    reference_correct: int
    candidate_correct: int
    losses: int  # reference right, candidate wrong
    gains: int  # reference wrong, candidate right
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def reference_top1(self) -> float:
        """Top-1 of the reference."""
        return self.reference_correct / self.n

    @property
    def candidate_top1(self) -> float:
        """Top-1 of the candidate."""
        return self.candidate_correct / self.n

    @property
    def drop(self) -> float:
        """Observed top-1 drop of the candidate (reference minus candidate); negative is a gain."""
        return (self.losses - self.gains) / self.n

    @property
    def z(self) -> float:
        """The two-sided normal quantile of `confidence`."""
        return NormalDist().inv_cdf(0.5 + self.confidence / 2)

    def _adjusted(self) -> tuple[float, float]:
        """(centre, standard error) of the drop after Agresti-Min's half-count per cell."""
        size = self.n + 2
        centre = (self.losses - self.gains) / size
        discordant = (self.losses + self.gains + 1) / size
        return centre, math.sqrt(max(discordant - centre**2, 0.0) / size)

    @property
    def interval(self) -> tuple[float, float]:
        """The `confidence` interval of the drop, clipped to [-1, 1]."""
        centre, error = self._adjusted()
        half = self.z * error
        return max(centre - half, -1.0), min(centre + half, 1.0)

    def images_to_resolve(self, budget: float) -> int | None:
        """Images whose interval would exclude `budget` (a fraction) at the observed rates.

        None when the observed drop equals the budget: no sample size separates them.
        """
        size = self.n + 2
        centre = (self.losses - self.gains) / size
        gap = abs(budget - centre)
        if gap < 1e-12:
            return None
        variance = max((self.losses + self.gains + 1) / size - centre**2, 0.0)
        return max(math.ceil(self.z**2 * variance / gap**2) - 2, self.n + 1)

    def counts(self) -> dict[str, int]:
        """The 2x2 table's counts, which `from_counts` reads back (for a measurement's JSON)."""
        return {
            "n": self.n,
            "reference_correct": self.reference_correct,
            "candidate_correct": self.candidate_correct,
            "losses": self.losses,
            "gains": self.gains,
        }

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, Any], confidence: float = DEFAULT_CONFIDENCE
    ) -> PairedComparison:
        """The comparison of a `counts()` mapping; UsageError when a count is missing or impossible.

        An optional "confidence" key (a sequential check's look, deploy.gates) overrides `confidence`.
        """
        try:
            n, losses, gains = int(counts["n"]), int(counts["losses"]), int(counts["gains"])
            ref, cand = int(counts["reference_correct"]), int(counts["candidate_correct"])
            confidence = float(counts.get("confidence", confidence))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(
                f"paired counts {dict(counts)!r}: expected n, losses, gains and correct counts"
            ) from exc
        if n < 1 or min(losses, gains, ref, cand) < 0 or losses + gains > n or ref - losses + gains != cand:
            raise UsageError(f"paired counts {dict(counts)!r} are inconsistent")
        if not 0.0 < confidence < 1.0:
            raise UsageError(f"paired counts {dict(counts)!r}: confidence must lie between 0 and 1")
        return cls(n, ref, cand, losses, gains, confidence)

    def as_dict(self) -> dict[str, float | int]:
        """A JSON-ready form (rates as fractions, the interval as drop_low/drop_high)."""
        low, high = self.interval
        return {
            "n": self.n,
            "reference_top1": self.reference_top1,
            "candidate_top1": self.candidate_top1,
            "losses": self.losses,
            "gains": self.gains,
            "drop": self.drop,
            "drop_low": low,
            "drop_high": high,
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class Verdict:
    """A gate's answer (ok, failed or inconclusive), a one-line reason, the images that would resolve it."""

    status: Status
    reason: str
    images_needed: int | None = None


def compare_correct(
    reference_correct: np.ndarray, candidate_correct: np.ndarray, confidence: float = DEFAULT_CONFIDENCE
) -> PairedComparison:
    """Pair two per-image correctness vectors (booleans, same images, same order)."""
    ref = np.asarray(reference_correct, dtype=bool).ravel()
    cand = np.asarray(candidate_correct, dtype=bool).ravel()
    if ref.shape != cand.shape:
        raise UsageError(f"paired comparison needs the same images: {ref.size} vs {cand.size} results")
    if ref.size == 0:
        raise UsageError("paired comparison needs at least one image")
    if not 0.0 < confidence < 1.0:
        raise UsageError(f"confidence {confidence}: expected a number between 0 and 1")
    return PairedComparison(
        n=int(ref.size),
        reference_correct=int(ref.sum()),
        candidate_correct=int(cand.sum()),
        losses=int(np.sum(ref & ~cand)),
        gains=int(np.sum(~ref & cand)),
        confidence=confidence,
    )


def compare_predictions(
    labels: np.ndarray,
    reference_predictions: np.ndarray,
    candidate_predictions: np.ndarray,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedComparison:
    """Pair the top-1 class predictions of two formats against the same labels."""
    labels = np.asarray(labels).ravel()
    return compare_correct(
        np.asarray(reference_predictions).ravel() == labels,
        np.asarray(candidate_predictions).ravel() == labels,
        confidence,
    )


def describe_drop(comparison: PairedComparison) -> str:
    """'drop 0.28 points (95% CI -0.10 to 0.66, 1,000 paired images)'; a sequential look's
    confidence keeps its digits ('99.67% CI')."""
    low, high = comparison.interval
    return (
        f"drop {100 * comparison.drop:.2f} points ({100 * comparison.confidence:.4g}% CI {100 * low:.2f}"
        f" to {100 * high:.2f}, {comparison.n:,} paired images)"
    )


def judge_drop(comparison: PairedComparison, budget_points: float) -> Verdict:
    """Hold the comparison's top-1 drop against a budget of `budget_points` percentage points."""
    if budget_points < 0:
        raise UsageError(f"top-1 drop budget {budget_points}: expected >= 0 points")
    budget = budget_points / 100
    low, high = comparison.interval
    observed = describe_drop(comparison)
    if low > budget:
        reason = f"{observed}: significantly more than the {budget_points:g}-point budget"
        return Verdict(Status.FAILED, reason)
    if high <= budget:
        return Verdict(Status.OK, f"{observed}: within the {budget_points:g}-point budget")
    needed = comparison.images_to_resolve(budget)
    more = f"about {needed:,} would at these rates" if needed else "no sample size would: the drop equals it"
    return Verdict(
        Status.INCONCLUSIVE,
        f"inconclusive: {comparison.n:,} images cannot resolve a {budget_points:g}-point budget"
        f" ({observed}); {more}",
        needed,
    )


def proportion_interval(
    successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes` / `n` (Wilson, JASA 1927): unlike the plain
    Wald interval it stays inside [0, 1] and keeps a width at 0 or `n` successes."""
    if n < 1 or not 0 <= successes <= n:
        raise UsageError(f"proportion {successes}/{n}: expected 0 <= successes <= n and n >= 1")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    rate = successes / n
    scale = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / scale
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


def judge_agreement(
    agreed: int,
    n: int,
    threshold_percent: float,
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    interim: bool = False,
) -> Verdict:
    """Hold a top-1 agreement of `agreed` out of `n` inputs against a minimum of `threshold_percent`,
    on its Wilson interval at `confidence`.

    The verdict is "failed" only when the whole interval lies below the minimum: the sample cannot
    tell one flipped near-tie from a file that agrees less (63 of 64 against 99%). A final verdict
    passes an agreement at or above the minimum; an `interim` one (a sequential check's interim
    look, deploy.gates) passes only when the whole interval lies at or above it, so that the check
    stops early only on a resolved gate. Anything else is "inconclusive".
    """
    low, high = proportion_interval(agreed, n, confidence)
    shown = f"{100 * confidence:.4g}% CI [{100 * low:.2f}, {100 * high:.2f}]"
    observed = f"{100 * agreed / n:.2f}% of {n:,} agree ({shown})"
    if interim and 100 * low >= threshold_percent:
        return Verdict(Status.OK, f"{observed}: all of it at or above the {threshold_percent:g}% minimum")
    if not interim and 100 * agreed >= threshold_percent * n:
        return Verdict(Status.OK, f"{observed}: at or above the {threshold_percent:g}% minimum")
    if 100 * high < threshold_percent:
        return Verdict(Status.FAILED, f"{observed}: significantly below the {threshold_percent:g}% minimum")
    if interim:
        return Verdict(
            Status.INCONCLUSIVE, f"inconclusive: {observed} straddles the {threshold_percent:g}% minimum"
        )
    return Verdict(
        Status.INCONCLUSIVE,
        f"inconclusive: {n:,} inputs cannot resolve a {threshold_percent:g}% agreement minimum ({observed})",
    )
