"""QAD's Q/DQ export: a fake-quantized student, traced to ONNX, runs in ONNX Runtime as it runs in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from export.onnx_export import save_onnx
from export.precision import zero_points_all_zero
from export.qad_export import activations_to_uint8, qdq_model, samples_within
from reviewkd.fake_quant import activation_quantizers, calibrate, quantize_student
from reviewkd.models import create_model

SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def quantized() -> torch.nn.Module:
    """A calibrated fake-quant cifar_resnet20 (residual adds, option-A shortcuts, a linear head)."""
    torch.manual_seed(0)
    model, _plan = quantize_student(create_model("cifar_resnet20", 10).eval(), SHAPE)
    generator = torch.Generator().manual_seed(0)
    calibrate(model, [torch.randn(64, *SHAPE, generator=generator) for _ in range(2)])
    return model.eval()


def _ort(path: Path, images: np.ndarray, *, integer_kernels: bool) -> np.ndarray:
    options = ort.SessionOptions()
    # With the QDQ fusions off, ONNX Runtime evaluates the graph's float semantics node by node.
    options.add_session_config_entry("session.disable_quant_qdq", "0" if integer_kernels else "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"images": images})[0])


def test_fake_quant_model_matches_its_onnx_export_in_onnxruntime(
    quantized: torch.nn.Module, tmp_path: Path
) -> None:
    proto = qdq_model(quantized, SHAPE, 18)
    path = tmp_path / "qad.onnx"
    save_onnx(proto, path)
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    # One Q/DQ pair per weight and per activation quantizer, symmetric, named after the module path.
    assert len(quantize) == 20 + len(activation_quantizers(quantized))
    assert zero_points_all_zero(proto)
    names = {n.name for n in quantize}
    assert any(name.startswith("/layer1/layer1.0/conv1/") for name in names)
    assert any(name.startswith("/layer2/layer2.0/downsample/output_quantizer/") for name in names)

    images = np.random.default_rng(1).standard_normal((256, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        expected = quantized(torch.from_numpy(images)).numpy()
    scale = float(np.abs(expected).max())
    for integer_kernels in (False, True):
        got = _ort(path, images, integer_kernels=integer_kernels)
        assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.99
        # Most samples agree to 1e-4; a value on a rounding boundary may land one int8 step apart.
        assert samples_within(got, expected, 1e-4) >= 0.9
        assert np.abs(got - expected).max() <= 0.1 * scale


def test_uint8_activation_copy_computes_the_same_values(quantized: torch.nn.Module, tmp_path: Path) -> None:
    proto = qdq_model(quantized, SHAPE, 18)
    int8_path, uint8_path = tmp_path / "int8.onnx", tmp_path / "uint8.onnx"
    save_onnx(proto, int8_path)
    assert activations_to_uint8(proto) == len(activation_quantizers(quantized))
    save_onnx(proto, uint8_path)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert sum(z.dtype == np.uint8 and int(z) == 128 for z in zero_points) == len(
        activation_quantizers(quantized)
    )
    assert sum(z.dtype == np.int8 and not z.any() for z in zero_points) == 20  # the weights stay int8
    onnx.checker.check_model(onnx.load(uint8_path), full_check=True)
    images = np.random.default_rng(2).standard_normal((64, *SHAPE), dtype=np.float32)
    np.testing.assert_allclose(
        _ort(uint8_path, images, integer_kernels=False),
        _ort(int8_path, images, integer_kernels=False),
        atol=1e-5,
    )
