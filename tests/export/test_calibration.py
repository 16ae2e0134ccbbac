"""Calibration measured on held-out training images: the split, the record, and the choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploy.errors import UsageError
from export.calibration import images_sha256, quantize_calibrated, split_training_images
from export.onnx_export import get_metadata
from export.precision import CALIBRATION_METHODS
from tests.helpers import INPUT_SHAPE, export_onnx, tiny_net


def _batches(count: int, size: int = 8, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((count, *INPUT_SHAPE)).astype(np.float32)
    labels = np.arange(count) % 4
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, count, size)]


def test_split_is_disjoint_and_in_order() -> None:
    source = _batches(40)
    data = split_training_images(iter(source), 16, 20, seed=7)
    everything = np.concatenate([b[0] for b in source])
    assert np.array_equal(np.concatenate(data.calibration), everything[:16])
    assert np.array_equal(np.concatenate(data.held_out), everything[16:36])
    assert np.array_equal(data.held_out_labels, np.arange(16, 36) % 4)
    record = data.describe()
    assert (record["images"], record["held_out_images"], record["seed"]) == (16, 20, 7)
    assert record["images_sha256"] == images_sha256([everything[:16]])  # batching does not matter
    assert record["held_out_sha256"] != record["images_sha256"]


def test_few_images_hold_out_at_most_half() -> None:
    data = split_training_images(iter(_batches(10)), 512, 1000, seed=None)
    assert data.describe()["images"] == 5 and data.describe()["held_out_images"] == 5
    explicit = split_training_images(iter(_batches(10)), 512, 0, seed=None)
    assert explicit.describe()["images"] == 10 and explicit.held_out == []


def test_sha256_sees_order_and_content() -> None:
    a, b = (pair[0] for pair in _batches(16))
    assert images_sha256([a, b]) != images_sha256([b, a])
    changed = a.copy()
    changed[0, 0, 0, 0] += 1e-3
    assert images_sha256([a]) != images_sha256([changed])


@pytest.mark.parametrize("flavour", ["cpu", "trt"])
def test_auto_tries_every_method_and_keeps_the_closest_logits(tmp_path: Path, flavour: str) -> None:
    fp32 = export_onnx(tiny_net(), tmp_path / "fp32.onnx")
    data = split_training_images(iter(_batches(96)), 32, 64, seed=0)
    description = quantize_calibrated(fp32, tmp_path / "int8.onnx", data, flavour=flavour)
    calibration = description["calibration"]
    scores = calibration["selection"]
    assert set(scores) == set(CALIBRATION_METHODS)
    best = min(scores.values(), key=lambda s: (s["logit_rel_l2"], -s["top1_agreement"]))
    assert scores[calibration["method"]] == best
    assert len({s["logit_rel_l2"] for s in scores.values()}) == len(scores)  # the L2 error decided
    assert calibration["images"] == 32 and calibration["held_out_images"] == 64
    assert calibration["images_sha256"] == images_sha256(data.calibration)
    stored = get_metadata(onnx.load(str(tmp_path / "int8.onnx")))["int8"]
    assert json.loads(json.dumps(stored)) == json.loads(json.dumps(description))


def test_an_explicit_method_is_used_and_recorded(tmp_path: Path) -> None:
    fp32 = export_onnx(tiny_net(), tmp_path / "fp32.onnx")
    data = split_training_images(iter(_batches(32)), 32, 0, seed=3)
    description = quantize_calibrated(fp32, tmp_path / "int8.onnx", data, flavour="cpu", method="percentile")
    assert description["calibration"]["method"] == "percentile"
    assert description["calibration"]["seed"] == 3 and "selection" not in description["calibration"]
    with pytest.raises(UsageError, match="held-out"):
        quantize_calibrated(fp32, tmp_path / "auto.onnx", data, flavour="cpu")
    with pytest.raises(UsageError, match="calib-method"):
        quantize_calibrated(fp32, tmp_path / "mse.onnx", data, flavour="cpu", method="mse")
