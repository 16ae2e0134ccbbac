"""int8 quantization: the cpu file holds its Q/DQ semantics in ONNX Runtime's fused int8 kernels;
the TensorRT file keeps full 8-bit weights and every ONNX Runtime session runs it unfused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from deploy.runners import OnnxRuntimeRunner
from deploy.runners.onnxruntime_runner import UNFUSED_QDQ_KEY
from export.check import run_onnx
from export.onnx_export import get_metadata
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


def _finely_weighted_net() -> nn.Module:
    """A wide conv with Gaussian weights: on 0/1 images (exact in int8) its error is mostly the
    weights', where the 8th bit halves the rounding step."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(SHAPE[0], 8, 3, padding=1), nn.Flatten()).eval()


def _images(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (count, *SHAPE)).astype(np.float32)  # 0 or 1


def _run(path: Path, images: np.ndarray, fused: bool) -> np.ndarray:
    """The file in ONNX Runtime with every Q/DQ fusion (fused) or none at all (ORT_DISABLE_ALL)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if fused else level.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"images": images})[0])


def _reference(path: Path, images: np.ndarray) -> np.ndarray:
    """The file's Q/DQ semantics by ONNX's own reference implementation (not ONNX Runtime).

    The reference implements QuantizeLinear/DequantizeLinear from opset 19 on; 19 only added
    float8 types and the saturate flag to them, and changed none of this file's other operators.
    """
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            assert opset.version in (18, 19), opset.version
            opset.version = 19
    return np.asarray(ReferenceEvaluator(model).run(None, {"images": images})[0])


def _int8_weights(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    arrays = [numpy_helper.to_array(i) for i in model.graph.initializer]
    return [a for a in arrays if a.dtype == np.int8 and a.ndim == 4]


def test_cpu_file_keeps_7_bit_weights_and_its_fused_kernels_match_its_qdq_semantics(tmp_path: Path) -> None:
    fp32 = export_onnx(_saturating_net(), tmp_path / "fp32.onnx", SHAPE)
    dst = tmp_path / "cpu.onnx"
    description = quantize_int8(fp32, dst, [_images(1, 32)], flavour="cpu")
    assert description["weight_bits"] == 7 and description[UNFUSED_QDQ_KEY] is False
    weights = _int8_weights(dst)
    assert weights and all(np.abs(w).max() <= 64 for w in weights)
    images = _images(2, 16)
    reference, fused = _run(dst, images, fused=False), _run(dst, images, fused=True)
    step = np.abs(reference).max() / 127  # one output quantization step, generously
    assert np.abs(fused - reference).max() <= step, np.abs(fused - reference).max()
    with OnnxRuntimeRunner(dst, providers=["CPUExecutionProvider"]) as runner:
        assert not runner.unfused_qdq


def test_trt_file_keeps_full_8_bit_weights_and_says_it_runs_unfused(tmp_path: Path) -> None:
    fp32 = export_onnx(_finely_weighted_net(), tmp_path / "fp32.onnx", SHAPE)
    dst = tmp_path / "trt.onnx"
    description = quantize_int8(fp32, dst, [_images(1, 32)], flavour="trt")
    assert description["weight_bits"] == 8 and description[UNFUSED_QDQ_KEY] is True
    assert get_metadata(onnx.load(str(dst)))["int8"] == description
    weights = _int8_weights(dst)
    assert len(weights) == 1
    for w in weights:
        # Symmetric per output channel: each channel's largest weight lands on +-127, none on -128.
        per_channel = np.abs(w.reshape(len(w), -1).astype(np.int32)).max(1)
        assert (per_channel == 127).all(), per_channel
        assert w.min() >= -127 and w.min() < -64 and w.max() > 64


def test_every_session_runs_the_trt_file_unfused_as_its_reference_semantics(tmp_path: Path) -> None:
    fp32 = export_onnx(_saturating_net(), tmp_path / "fp32.onnx", SHAPE)
    dst = tmp_path / "trt.onnx"
    quantize_int8(fp32, dst, [_images(1, 32)], flavour="trt")
    images = _images(2, 16)
    reference = _reference(dst, images)
    step = np.abs(reference).max() / 127
    unfused = _run(dst, images, fused=False)
    assert np.abs(unfused - reference).max() <= 1e-3 * step
    # export's checks (and the calibration and mixed-precision scores, which call run_onnx) and
    # deploy's runner (predict, validate, bench) all run the file as ORT_DISABLE_ALL does, bit for bit.
    np.testing.assert_array_equal(run_onnx(dst, [images]), unfused)
    with OnnxRuntimeRunner(dst, providers=["CPUExecutionProvider"]) as runner:
        assert runner.unfused_qdq
        np.testing.assert_array_equal(runner.infer(images), unfused)
    # ONNX Runtime's fused kernels do no better; on x86 CPUs without VNNI they saturate on this net.
    fused = _run(dst, images, fused=True)
    assert np.abs(fused - reference).max() >= np.abs(unfused - reference).max()


def test_the_trt_files_8th_weight_bit_brings_it_closer_to_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32 = export_onnx(_finely_weighted_net(), tmp_path / "fp32.onnx", SHAPE)
    seven_bits = dataclasses.replace(INT8_FLAVOURS["trt"], name="trt7", weight_bits=7)
    monkeypatch.setitem(INT8_FLAVOURS, "trt7", seven_bits)
    calibration, images = [_images(1, 64)], _images(2, 64)
    expected = run_onnx(fp32, [images]).astype(np.float64)

    def rel_error(flavour: str) -> float:
        path = tmp_path / f"{flavour}.onnx"
        quantize_int8(fp32, path, calibration, flavour=flavour)
        logits = run_onnx(path, [images]).astype(np.float64)
        return float(np.linalg.norm(logits - expected) / np.linalg.norm(expected))

    eight, seven = rel_error("trt"), rel_error("trt7")
    assert eight < 0.8 * seven, (eight, seven)


def test_compute_in_fp16_converts_only_the_named_nodes(tmp_path: Path) -> None:
    from deploy.errors import UsageError
    from export.precision import compute_in_fp16

    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(SHAPE[0], 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * SHAPE[1] * SHAPE[2], 5),
    ).eval()
    fp32 = export_onnx(net, tmp_path / "fp32.onnx", SHAPE)
    model = onnx.load(str(fp32))
    with pytest.raises(UsageError, match="no node named /9/Conv"):
        compute_in_fp16(model, ["/9/Conv"])
    # Two nodes in a row, and the node that makes the graph's output.
    compute_in_fp16(model, ["/0/Conv", "/1/Conv", "/4/Gemm"])
    onnx.checker.check_model(model, full_check=True)
    nodes = {n.name: n for n in model.graph.node}
    fp16 = onnx.TensorProto.FLOAT16
    halves = {i.name for i in model.graph.initializer if i.data_type == fp16}
    assert {i for name in ("/0/Conv", "/1/Conv", "/4/Gemm") for i in nodes[name].input[1:]} == halves
    assert not {i.name for i in model.graph.initializer} & {"0.weight", "1.weight", "4.weight"}
    assert nodes["/1/Conv"].input[0] == nodes["/0/Conv"].output[0]  # fp16 straight through
    casts = [(n.input[0], n.attribute[0].i) for n in model.graph.node if n.op_type == "Cast"]
    # In: the image and the flattened features to fp16. Out: the conv's output for the fp32 Relu, and
    # the logits.
    assert sorted(to for _, to in casts) == [onnx.TensorProto.FLOAT] * 2 + [fp16] * 2
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    images = np.random.default_rng(3).standard_normal((8, *SHAPE)).astype(np.float32)
    half = tmp_path / "half.onnx"
    onnx.save(model, str(half))
    expected = run_onnx(fp32, [images])
    logits = run_onnx(half, [images])
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-2 * np.abs(expected).max())
    assert not np.array_equal(logits, expected)  # the weights, at least, were rounded to fp16


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


def test_nodes_onnxruntime_inlines_get_unique_names_in_their_module_scope(tmp_path: Path) -> None:
    # MobileNetV3's Hardswish: ORT's pre-processing inlines it into HardSigmoid and Mul without names,
    # and mixed precision addresses (and excludes) nodes by name
    import onnx
    import torch

    from export.onnx_export import module_path, torch_export
    from export.precision import Int8Quantizer

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.act = torch.nn.Hardswish()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.act(self.conv(x))).flatten(1))

    source = tmp_path / "net.onnx"
    onnx.save(torch_export(Net().eval(), (3, 8, 8), 18), str(source))
    batches = [np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)]
    with Int8Quantizer(source, batches, flavour="trt", method="minmax") as quantizer:
        names = [node.name for node in onnx.load(str(quantizer.prepared)).graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert any(name.endswith("/Mul") and module_path(name) == "act" for name in names), names
