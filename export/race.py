"""Early exits for the calibration candidates' race: a candidate drops out once it is clearly behind.

The candidates (export.calibration.race) run on the held-out training images one batch at a time.
After RACE_MIN_IMAGES images, each is compared, image by image on the same images, with the leading
candidate; one whose paired difference has a two-sided RACE_CONFIDENCE interval entirely on the
losing side stops there. The candidates that run to the end decide as before, on all the images;
an early stop is wrong only when the interval missed, at most (1 - RACE_CONFIDENCE) / 2 of the time.
(The mixed-precision steps stop early through the budget's own sequential judgement.)
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

RACE_MIN_IMAGES = 200
RACE_CONFIDENCE = 0.999


def clearly_above(differences: np.ndarray, confidence: float = RACE_CONFIDENCE) -> bool:
    """Whether the mean of paired per-image `differences` is above 0 beyond doubt: the lower end of
    its two-sided `confidence` normal interval (mean - z * sd / sqrt(n)) is above 0."""
    count = len(differences)
    if count < 2:
        return False
    spread = float(np.std(differences, ddof=1)) / np.sqrt(count)
    return float(np.mean(differences)) - NormalDist().inv_cdf(0.5 + confidence / 2) * spread > 0
