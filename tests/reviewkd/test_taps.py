"""reviewkd/taps.py: input taps (`path:input`) and the teacher's pre-activation taps."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from deploy.errors import UsageError
from reviewkd import ReviewKD
from reviewkd.models import create_model
from reviewkd.taps import FeatureTaps, default_taps, pre_activation_taps

SHAPE = (3, 32, 32)


def _images(count: int = 4) -> torch.Tensor:
    return torch.randn((count, *SHAPE), generator=torch.Generator().manual_seed(5))


def test_cifar_resnet_stages_are_read_before_the_last_blocks_relu() -> None:
    model = create_model("cifar_resnet20", 10).eval()
    taps = pre_activation_taps(model, default_taps(model, SHAPE), SHAPE)
    assert taps == ["layer1.2.relu2:input", "layer2.2.relu2:input", "layer3.2.relu2:input", "avgpool"]

    with torch.no_grad():
        _, pre = FeatureTaps(model, taps, SHAPE)(_images())
        _, post = FeatureTaps(model, default_taps(model, SHAPE), SHAPE)(_images())
    for level in range(3):
        # The in-place ReLU did not overwrite what was recorded: it still holds negative values,
        # and the ReLU of it is the stage's output.
        assert pre[level].min() < 0
        torch.testing.assert_close(torch.relu(pre[level]), post[level], rtol=0, atol=0)
    torch.testing.assert_close(pre[3], post[3], rtol=0, atol=0)


def test_a_shared_relu_keeps_its_last_call() -> None:
    # torchvision's BasicBlock runs one ReLU module twice; the second call ends the block.
    model = torchvision.models.resnet18(num_classes=10).eval()
    taps = pre_activation_taps(model, ["layer3", "layer4", "avgpool"], SHAPE)
    assert taps == ["layer3.1.relu:input", "layer4.1.relu:input", "avgpool"]
    with torch.no_grad():
        _, pre = FeatureTaps(model, taps, SHAPE)(_images())
        _, post = FeatureTaps(model, ["layer3", "layer4"], SHAPE)(_images())
    for level in range(2):
        assert pre[level].min() < 0
        torch.testing.assert_close(torch.relu(pre[level]), post[level], rtol=0, atol=0)


def test_stages_that_do_not_end_in_a_relu_stay_as_they_are() -> None:
    # MobileNetV3's inverted residuals end in a linear projection (plus the skip).
    model = create_model("torchvision:mobilenet_v3_small", 10)
    taps = default_taps(model, SHAPE)
    assert pre_activation_taps(model, taps, SHAPE) == taps
    # A ReLU inside a module whose output comes after it (conv after the ReLU) is not its end.
    inner_relu = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )
    assert pre_activation_taps(inner_relu, ["0", "1"], SHAPE) == ["0", "1"]
    # A tap that already reads an input is left alone.
    assert pre_activation_taps(inner_relu, ["0.1:input"], SHAPE) == ["0.1:input"]


def test_an_input_tap_on_the_training_student_carries_gradients() -> None:
    model = create_model("cifar_resnet20", 10).train()
    taps = FeatureTaps(model, ["layer1.2.relu2:input", "layer3.2.relu2:input"], SHAPE)
    logits, features = taps(_images())
    (features[0].square().mean() + features[1].mean() + logits.sum()).backward()
    conv = model.layer1[0].conv1.weight
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    assert [info.channels for info in taps.info] == [16, 64]


def test_an_input_tap_of_a_missing_module_names_the_module_and_the_tap() -> None:
    expected = r"no module 'layer1\.7\.relu2' to tap \(tap 'layer1\.7\.relu2:input'\)"
    with pytest.raises(UsageError, match=expected):
        FeatureTaps(create_model("cifar_resnet20", 10), ["layer1.7.relu2:input"], SHAPE)


@pytest.mark.parametrize("fuse_teacher", [False, True])
def test_the_distiller_reads_the_teachers_pre_activations_by_default(fuse_teacher: bool) -> None:
    teacher = create_model("cifar_resnet20", 10).eval()
    distiller = ReviewKD(create_model("cifar_resnet20", 10), teacher, SHAPE, fuse_teacher=fuse_teacher)
    assert [info.path for info in distiller.teacher_taps.info] == [
        "layer1.2.relu2:input",
        "layer2.2.relu2:input",
        "layer3.2.relu2:input",
        "avgpool",
    ]
    # The student's own features stay the stage outputs, as in the reference.
    assert [info.path for info in distiller.student_taps.info] == ["layer1", "layer2", "layer3", "avgpool"]
    with torch.no_grad():
        _, features = distiller.teacher_taps(_images())
        _, expected = FeatureTaps(teacher, [i.path for i in distiller.teacher_taps.info], SHAPE)(_images())
    for got, want in zip(features, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pre_activation_can_be_turned_off_and_named_taps_are_taken_as_written() -> None:
    def pair() -> tuple[nn.Module, nn.Module]:
        return create_model("cifar_resnet20", 10), create_model("cifar_resnet20", 10)

    off = ReviewKD(*pair(), SHAPE, teacher_pre_activation=False)
    assert [info.path for info in off.teacher_taps.info] == ["layer1", "layer2", "layer3", "avgpool"]
    named = ReviewKD(*pair(), SHAPE, student_taps=["layer2", "avgpool"], teacher_taps=["layer2", "avgpool"])
    assert [info.path for info in named.teacher_taps.info] == ["layer2", "avgpool"]
