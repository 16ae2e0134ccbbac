"""The images a capped check reads: spread over the class-ordered split, the same on every path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.images import iter_folder_batches
from deploy.manifest import InputSpec
from deploy.sampling import spread_indices


def test_spread_indices_cover_every_class_of_a_class_ordered_split() -> None:
    labels = np.repeat(np.arange(10), 100)  # 10 classes of 100, stored class by class
    chosen = spread_indices(len(labels), 50)
    assert len(chosen) == len(set(chosen)) == 50 and chosen == sorted(chosen)
    assert np.bincount(labels[chosen], minlength=10).tolist() == [5] * 10


@pytest.mark.parametrize("limit", [None, 7, 7000])
def test_spread_indices_all_when_uncapped(limit: int | None) -> None:
    assert spread_indices(7, limit) == list(range(7))


def test_spread_indices_single_image() -> None:
    assert spread_indices(10, 1) == [0]


def test_torch_free_folder_reader_takes_the_same_images(tmp_path: Path) -> None:
    classes = ["a", "b", "c"]
    for label, name in enumerate(classes):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(np.full((4, 4, 3), 10 * label + i, dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    spec = InputSpec(shape=(3, 4, 4), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=None)
    labels = np.concatenate([b[1] for b in iter_folder_batches(tmp_path, spec, classes, 2, limit=6)])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
