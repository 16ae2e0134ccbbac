"""int8 quantization: the files ONNX Runtime's fused int8 kernels run hold their Q/DQ semantics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from export.precision import INT8_FLAVOURS, quantize_int8
from tests.helpers import export_onnx

SHAPE = (16, 6, 6)


def _saturating_net() -> nn.Module:
    """A conv whose weights all sit at +-max: with uint8 inputs near 255, pairs of 8-bit products
    overflow the int16 sums of AVX2's vpmaddubsw unless the weights keep to 7 bits."""
    torch.manual_seed(0)
    conv = nn.Conv2d(SHAPE[0], 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.sign(torch.randn_like(conv.weight)) * 0.05)
    return nn.Sequential(conv, nn.Flatten()).eval()


def _images(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (count, *SHAPE)).astype(np.float32)  # 0 or 1


def _run(path: Path, images: np.ndarray, fused: bool) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # BASIC folds constants but keeps Q/DQ as separate float ops: the file's reference semantics.
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if fused else level.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"images": images})[0])


@pytest.mark.parametrize("flavour", sorted(INT8_FLAVOURS))
def test_fused_int8_kernels_match_the_files_qdq_semantics(tmp_path: Path, flavour: str) -> None:
    fp32 = export_onnx(_saturating_net(), tmp_path / "fp32.onnx", SHAPE)
    dst = tmp_path / f"{flavour}.onnx"
    description = quantize_int8(fp32, dst, [_images(1, 32)], flavour=flavour)
    assert description["weight_bits"] == 7
    model = onnx.load(str(dst))
    weights = [
        numpy_helper.to_array(i) for i in model.graph.initializer if numpy_helper.to_array(i).dtype == np.int8
    ]
    assert weights and all(np.abs(w).max() <= 64 for w in weights)
    images = _images(2, 16)
    reference, fused = _run(dst, images, fused=False), _run(dst, images, fused=True)
    step = np.abs(reference).max() / 127  # one output quantization step, generously
    assert np.abs(fused - reference).max() <= step, np.abs(fused - reference).max()


@pytest.mark.parametrize("kind", ["relu", "normal", "outlier", "heavy_tail"])
def test_entropy_threshold_equals_onnxruntimes_search(kind: str) -> None:
    import contextlib
    import io

    from onnxruntime.quantization.calibrate import HistogramCollector

    from export.precision import entropy_threshold

    rng = np.random.default_rng(0)
    data = {
        "relu": np.maximum(rng.standard_normal(20000), 0),
        "normal": rng.standard_normal(20000) * 3,
        "outlier": np.concatenate([rng.laplace(size=20000), [40.0]]),
        "heavy_tail": np.abs(rng.standard_cauchy(20000)),
    }[kind].astype(np.float32)
    collector = HistogramCollector("entropy", False, 512, 256, None, None)
    with contextlib.redirect_stdout(io.StringIO()):
        collector.collect({"t": [data]})
    histogram = collector.histogram_dict["t"]
    ours = entropy_threshold(histogram, 256)
    theirs = collector.get_entropy_threshold(histogram, 256)
    assert [float(v) for v in ours] == [float(v) for v in theirs]
