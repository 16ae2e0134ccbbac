"""Which validation images a check reads when it may not read them all.

Validation splits are stored class by class (an ImageFolder tree lists its classes in order), so
"the first N images" is a few classes only: on CIFAR-10 the first 2,000 test images are airplanes
and automobiles, where a ResNet-20 scores 82% against its 74% overall. A capped check instead reads
N images spread evenly over the split, the same ones on every machine and in every command (export,
validate, layerwise, with or without torch), so paired comparisons stay paired.
"""

from __future__ import annotations


def spread_indices(total: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(total), in increasing order; all of them when
    `limit` is None or at least `total`."""
    if limit is None or limit >= total:
        return list(range(total))
    return [i * total // limit for i in range(limit)]
