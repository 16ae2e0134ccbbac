"""Shared fixtures: paths to ../shared (skipped with a reason where absent) and determinism."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

SHARED_DIR = Path(os.environ.get("REVIEWKD_SHARED", REPO_ROOT.parent / "shared"))


def _shared_path(*parts: str) -> Path:
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (set REVIEWKD_SHARED to the folder holding data/ and weights/)")
    return path


@pytest.fixture
def cifar10_dir() -> Path:
    """The JPEG CIFAR-10 copy in ImageFolder layout (train/, test/)."""
    return _shared_path("data", "cifar10")


@pytest.fixture
def cifar_weights_dir() -> Path:
    """The pretrained CIFAR-10 ResNet checkpoints."""
    return _shared_path("weights", "cifar10-resnet")


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)
