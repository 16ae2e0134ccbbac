"""Early exits for export's searches: a candidate drops out once paired evidence puts it clearly behind.

The calibration candidates (export.calibration.race) and the steps of the mixed-precision search
(export.mixed_precision.fit_budget) run on the held-out training images one batch at a time. After
RACE_MIN_IMAGES images, each is compared, image by image on the same images, with what it must beat
(the leading candidate; the budget); one whose two-sided RACE_CONFIDENCE interval lies entirely on
the losing side stops there. A run to the end decides as before on all the images; an early stop
is wrong only when the interval missed, about (1 - RACE_CONFIDENCE) / 2 of the time.
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
