"""export.check's sequential check: it stops at the look that resolves its gates and says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploy.status import Status
from export.check import check_file, check_looks, run_onnx
from tests.helpers import export_tiny_onnx, image_batches, tiny_module

IMAGES = 4000  # looks at 500, 1000, 2000 and 4000 images
BATCH = 64


def _data(path: Path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    pairs = image_batches(IMAGES, BATCH, labeller=tiny_module())
    batches = [images for images, _ in pairs]
    return batches, run_onnx(path, batches), np.concatenate([labels for _, labels in pairs])


def test_an_int8_check_stops_at_the_first_look_that_resolves_its_gate(tmp_path: Path) -> None:
    path = export_tiny_onnx(tiny_module(), tmp_path / "same.onnx")
    batches, reference, labels = _data(path)
    result = check_file(path, "int8", batches, reference, labels)
    assert result.status == Status.OK
    # The first look, 500 images, moved up to the next batch boundary (8 x 64).
    assert result.metrics["n"] == result.metrics["paired"]["n"] == 512
    record = result.metrics["sequential"]
    assert record["images_available"] == IMAGES
    assert [look["images"] for look in record["looks"]] == [512, 1024, 2048, IMAGES]
    assert record["looks_taken"] == 1 and record["stopped_early"]
    assert result.metrics["paired"]["confidence"] == record["looks"][0]["confidence"] > 0.99
    assert "stopped at look 1 of 4, 512 of 4,000 images" in result.reason
    assert "99.67% CI" in result.reason


def test_a_file_over_its_budget_fails_early_and_a_file_with_a_point_gate_uses_every_image(
    tmp_path: Path,
) -> None:
    good = export_tiny_onnx(tiny_module(), tmp_path / "good.onnx")
    bad = export_tiny_onnx(tiny_module(seed=1), tmp_path / "other.onnx")  # another network altogether
    batches, reference, labels = _data(good)
    result = check_file(bad, "int8", batches, reference, labels)
    assert result.status == Status.FAILED
    assert result.metrics["sequential"]["stopped_early"]
    assert result.metrics["n"] < IMAGES
    # fp32's max_abs_diff and 100% agreement hold for every image: no interval can settle them early.
    whole = check_file(good, "fp32", batches, reference, labels)
    assert whole.metrics["n"] == IMAGES and "sequential" not in whole.metrics
    # Random inputs (no labels): no interval on the drop, so one look at every input.
    assert len(check_looks("int8", batches, None)) == 1
    assert len(check_looks("fp16", batches, None)) == 1


def test_an_fp16_agreement_check_stops_once_its_interval_clears_the_minimum(tmp_path: Path) -> None:
    good = export_tiny_onnx(tiny_module(), tmp_path / "good.onnx")
    batches, reference, labels = _data(good)
    agreeing = check_file(good, "fp16", batches, reference, labels)
    assert agreeing.status == Status.OK
    # 512 images that all agree cannot put the 99.67% interval above 99% (its low end is 98.4%);
    # 1,024 can (99.2%).
    assert agreeing.metrics["n"] == 1024 and agreeing.metrics["sequential"]["looks_taken"] == 2
    assert "all of it at or above the 99% minimum" in agreeing.reason
    assert "stopped at look 2 of 4, 1,024 of 4,000 images" in agreeing.reason
    # 1.2% of the images flipped, evenly spread: every interim interval straddles 99%, so the check
    # reads every image and the point estimate (98.8%) fails it, as a check without looks would.
    flipped = reference.copy()
    rows = np.arange(0, IMAGES, IMAGES // 48)[:48]
    top = flipped[rows].argmax(1)
    flipped[rows, top] = flipped[rows].min(1) - 1.0
    result = check_file(good, "fp16", batches, flipped, labels)
    assert result.status == Status.FAILED
    assert result.metrics["n"] == IMAGES and result.metrics["sequential"]["looks_taken"] == 4
    assert result.metrics["top1_agreement"] == 100 * (IMAGES - 48) / IMAGES
