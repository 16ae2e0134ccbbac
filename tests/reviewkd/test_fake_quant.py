"""Fake quantization: TensorRT's placement found on real models, per-channel weights on the int8 grid,
observed activation ranges (calibration mean, frozen in eval, moving in train)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploy.errors import UsageError
from reviewkd.fake_quant import (
    ActivationQuantizer,
    QuantConv2d,
    QuantLinear,
    activation_quantizers,
    calibrate,
    quantize_student,
    quantize_weight,
)
from reviewkd.models import create_model
from tests.helpers import INPUT_SHAPE, tiny_net


def test_placement_on_a_cifar_resnet_quantizes_conv_inputs_and_residual_adds() -> None:
    model = create_model("cifar_resnet20", 10).eval()
    quantized, plan = quantize_student(model, (3, 8, 8))
    # The network input and the flattened pool have no producing module: their readers quantize them.
    assert plan.inputs == ["conv1", "linear"]
    # A block's output ReLU feeds the next block's conv1 and its identity add: one quantizer serves both.
    assert {"relu", "layer1.0.relu1", "layer1.0.relu2", "layer2.2.relu2"} <= set(plan.outputs)
    # The option-A shortcuts' outputs are the residual operands of the two downsampling blocks.
    assert {"layer2.0.downsample", "layer3.0.downsample"} <= set(plan.outputs)
    # The last ReLU feeds only the average pool: TensorRT keeps that in float, so no quantizer.
    assert "layer3.2.relu2" not in plan.outputs
    assert plan.residual_adds == 9 and plan.unquantized_add_operands == 0
    assert len(plan.weights) == 20 and len(activation_quantizers(quantized)) == 22
    # Module paths are the student's; BatchNorm is folded away; the original is untouched.
    assert isinstance(quantized.get_submodule("layer1.0.conv1"), QuantConv2d)
    assert isinstance(quantized.get_submodule("linear"), QuantLinear)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in quantized.modules())
    assert type(model.get_submodule("layer1.0.conv1")) is nn.Conv2d
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in quantized.parameters())


def test_weights_are_symmetric_int8_per_output_channel() -> None:
    weight = torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 5.0, 8).view(8, 1, 1, 1)
    scale = weight.abs().amax(dim=(1, 2, 3)) / 127
    levels = quantize_weight(weight) / scale.view(8, 1, 1, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().amax(dim=(1, 2, 3)).round().tolist() == [127.0] * 8
    assert (quantize_weight(weight) - weight).abs().max() <= scale.max() / 2 + 1e-6


def test_calibration_averages_batch_maxima_and_eval_freezes_the_range() -> None:
    quantized, plan = quantize_student(tiny_net(), INPUT_SHAPE)
    assert plan.inputs == ["conv", "fc"]
    quantizer = quantized.get_submodule("conv.input_quantizer")
    assert isinstance(quantizer, ActivationQuantizer)
    batches = [torch.full((2, *INPUT_SHAPE), 2.0), torch.full((2, *INPUT_SHAPE), -4.0)]
    assert calibrate(quantized, batches) == 4
    assert quantizer.amax.item() == pytest.approx(3.0)
    assert not quantized.training
    quantized(torch.full((1, *INPUT_SHAPE), 100.0))
    assert quantizer.amax.item() == pytest.approx(3.0)  # eval: frozen
    quantized.train()(torch.full((1, *INPUT_SHAPE), 6.0))
    assert quantizer.amax.item() == pytest.approx(3.0 + (6.0 - 3.0) / 3)  # train: running mean, 3rd batch
    with pytest.raises(UsageError, match="no images"):
        calibrate(quantized, [])


def test_a_model_without_conv_or_linear_layers_is_refused() -> None:
    with pytest.raises(UsageError, match="no Conv2d or Linear"):
        quantize_student(nn.Sequential(nn.ReLU(), nn.Flatten()), INPUT_SHAPE)
