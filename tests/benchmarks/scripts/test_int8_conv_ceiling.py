"""benchmarks/scripts/int8_conv_ceiling.py: its int8 convolutions compute the fp32 one, so the
speed-ups it prints compare the same work."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.scripts.int8_conv_ceiling import _fp32_conv, _int8_conv, _session, time_stage


@pytest.mark.parametrize(("weight_type", "per_channel"), [("int8", True), ("int8", False), ("uint8", False)])
def test_each_int8_convolution_matches_fp32_within_its_rounding(weight_type: str, per_channel: bool) -> None:
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.1
    x_uint8 = rng.integers(98, 158, (2, 8, 6, 6), dtype=np.uint8)  # +-1.5 around zero point 128
    x_float = (x_uint8.astype(np.float32) - 128) * 0.05
    (expected,) = _session(_fp32_conv(8, weights)).run(None, {"x": x_float})
    (got,) = _session(_int8_conv(8, weights, weight_type, per_channel)).run(None, {"x": x_uint8})
    dequantized = (got.astype(np.float32) - 128) * 0.05
    assert got.dtype == np.uint8 and dequantized.shape == expected.shape
    assert np.abs(expected).max() < 6.0  # inside the output's int8 range: no clipping
    # Output rounding (half a step, 0.025) plus the weights' rounding over 72 taps.
    assert np.abs(dequantized - expected).max() < 0.06


def test_every_variant_is_timed() -> None:
    medians = time_stage(8, 6, batch=2, rounds=1)
    assert set(medians) == {"fp32 Conv", "u8 x s8 per-channel", "u8 x s8 per-tensor", "u8 x u8 per-tensor"}
    assert all(ms > 0 for ms in medians.values())
