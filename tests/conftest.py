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


@pytest.fixture(scope="session")
def tiny_detection_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real detection run in seconds: the small FCOS student trained alone (method plain) for two
    epochs on 48 embedded digit images (enough for detections above its score threshold), scored on
    12; its data generated into the fixture's own folder.
    Tests copy it before changing it."""
    from reviewkd.config import load_config
    from reviewkd.detection.engine import distill_detector

    folder = tmp_path_factory.mktemp("detection")
    config = load_config(
        "digits_detection",
        [
            f"data.root={folder / 'data'}",
            "method.name=plain",
            "train.epochs=2",
            "train.eval_every=2",
            "detection.digits_train_images=48",
            "detection.digits_val_images=12",
            "data.val_split=null",  # the default carves 128 training canvases
        ],
    )
    run = folder / "run"
    distill_detector(config, run)
    return run
