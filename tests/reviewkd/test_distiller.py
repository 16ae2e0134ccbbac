"""ReviewKD on real small models: losses, gradients, the frozen teacher, the bare student."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from deploy.errors import UsageError
from reviewkd import ReviewKD, build_distiller, default_taps
from reviewkd.models import create_model


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def _one_step(
    distiller: ReviewKD, input_shape: tuple[int, int, int], batch: int = 4
) -> dict[str, torch.Tensor]:
    distiller.train()
    optimizer = torch.optim.SGD(
        list(distiller.student.parameters()) + list(distiller.head.parameters()), lr=0.01, momentum=0.9
    )
    images = torch.randn(batch, *input_shape)
    targets = torch.randint(0, 10, (batch,))
    out = distiller(images, targets)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    return out


PAIRS = [
    pytest.param("resnet32x4", "resnet8x4", (3, 32, 32), id="resnet32x4->resnet8x4"),
    pytest.param(
        "torchvision:resnet18", "torchvision:mobilenet_v3_small", (3, 96, 128), id="resnet18->mbv3s-96x128"
    ),
]


@pytest.mark.parametrize(("teacher_name", "student_name", "input_shape"), PAIRS)
def test_training_step(teacher_name: str, student_name: str, input_shape: tuple[int, int, int]) -> None:
    teacher = create_model(teacher_name, num_classes=10)
    student = create_model(student_name, num_classes=10)
    distiller = ReviewKD(student, teacher, input_shape=input_shape, hcl_weight=1.0)
    teacher_before = _bn_stats(teacher)
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}

    out = _one_step(distiller, input_shape)

    assert torch.isfinite(out["loss"]) and out["hcl"] > 0
    assert out["logits"].shape == (4, 10)
    assert distiller.student is student and distiller.teacher is teacher
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(p.grad is None for p in teacher.parameters())
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name, p in distiller.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for key, value in _bn_stats(teacher).items():
        torch.testing.assert_close(value, teacher_before[key], msg=key)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_weights[key], msg=key)
    # the chain maps each student level to its teacher level's channels and size
    for abf, t_info in zip(distiller.head.abfs, distiller.teacher_taps.info, strict=True):
        assert abf.conv2[0].out_channels == t_info.channels


def test_teacher_stays_in_eval_whatever_train_is_called_with() -> None:
    distiller = ReviewKD(
        create_model("resnet8x4", 10), create_model("resnet8x4", 10), input_shape=(3, 32, 32)
    )
    distiller.train(True)
    assert distiller.student.training and distiller.head.training and not distiller.teacher.training
    distiller.teacher.train()  # even a direct call on the whole distiller afterwards cannot unfreeze it
    distiller.train()
    assert not distiller.teacher.training
    distiller.eval()
    assert not distiller.student.training


def test_bare_student_state_dict_holds_no_abf_or_teacher_keys() -> None:
    student = create_model("resnet8x4", 10)
    keys_before = set(student.state_dict())
    distiller = ReviewKD(student, create_model("resnet32x4", 10), input_shape=(3, 32, 32))
    _one_step(distiller, (3, 32, 32))
    keys = set(distiller.student.state_dict())
    assert keys == keys_before
    assert not any("abf" in k or "teacher" in k or "att_conv" in k for k in keys)
    # outside a distiller call the taps record nothing: the student runs and exports as before
    distiller.student.eval()
    assert distiller.student(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert not distiller.student_taps._features


def test_mid_channels_default_is_min_512_and_deepest_student_channels() -> None:
    distiller = ReviewKD(
        create_model("resnet8x4", 10), create_model("resnet32x4", 10), input_shape=(3, 32, 32)
    )
    assert distiller.head.mid_channels == min(512, distiller.student_taps.info[-1].channels)


def test_student_and_teacher_maps_of_different_sizes() -> None:
    teacher = torchvision.models.resnet18(num_classes=10)
    student = create_model("resnet8x4", 10)  # stays at 32/16/8 where resnet18 goes 8/4/2/1 at 32x32
    distiller = ReviewKD(
        student, teacher, input_shape=(3, 32, 32), teacher_taps=["layer2", "layer3", "layer4", "avgpool"]
    )
    out = _one_step(distiller, (3, 32, 32))
    assert torch.isfinite(out["loss"])


def test_torchvision_resnet_default_taps() -> None:
    assert default_taps(torchvision.models.resnet18(), (3, 64, 64)) == [
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "avgpool",
    ]


def test_unknown_tap_names_model_and_tap() -> None:
    with pytest.raises(UsageError, match="no module 'layer9'"):
        ReviewKD(
            create_model("resnet8x4", 10),
            create_model("resnet32x4", 10),
            input_shape=(3, 32, 32),
            teacher_taps=["layer1", "layer2", "layer9", "avgpool"],
        )


def test_explicit_taps_of_unequal_length_name_both_models_and_the_keys() -> None:
    with pytest.raises(UsageError, match=r"cannot pair student .* teacher .*2 levels vs 3; set method"):
        ReviewKD(
            create_model("resnet8x4", 10),
            torchvision.models.resnet18(num_classes=10),
            input_shape=(3, 32, 32),
            student_taps=["layer3", "avgpool"],
            teacher_taps=["layer3", "layer4", "avgpool"],
        )


def test_default_taps_of_unequal_length_pair_the_deepest_levels() -> None:
    # mobilenet_v3_small on 32x32 shows 16, 8, 4 and 2 px stages; the CIFAR ResNet 32, 16 and 8 px
    distiller = ReviewKD(
        create_model("torchvision:mobilenet_v3_small", 10),
        create_model("cifar_resnet20", 10),
        input_shape=(3, 32, 32),
    )
    assert [i.path for i in distiller.student_taps.info] == [
        "features.1",
        "features.3",
        "features.8",
        "avgpool",
    ]
    assert [i.path for i in distiller.teacher_taps.info] == [
        "layer1.2.relu2:input",
        "layer2.2.relu2:input",
        "layer3.2.relu2:input",
        "avgpool",
    ]
    out = _one_step(distiller, (3, 32, 32))
    assert torch.isfinite(out["loss"]) and out["hcl"] > 0


@pytest.mark.parametrize("method", ["ce", "kd", "reviewkd", "reviewkd+kd"])
def test_build_distiller_methods(method: str) -> None:
    teacher = create_model("resnet8x4", 10)
    distiller = build_distiller(method, create_model("resnet8x4", 10), teacher, (3, 32, 32), hcl_weight=0.5)
    distiller.distill_scale = 0.5
    out = distiller(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert torch.isfinite(out["loss"])
    assert ("hcl" in out) == method.startswith("reviewkd")
    assert ("kd" in out) == (method in ("kd", "reviewkd+kd"))


def test_distill_scale_zero_leaves_only_cross_entropy() -> None:
    distiller = build_distiller(
        "reviewkd+kd", create_model("resnet8x4", 10), create_model("resnet8x4", 10), (3, 32, 32)
    )
    distiller.distill_scale = 0.0
    out = distiller(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    torch.testing.assert_close(out["loss"], out["ce"])


def test_bad_method_and_missing_teacher() -> None:
    with pytest.raises(UsageError, match="method 'fitnet' is unknown"):
        build_distiller("fitnet", create_model("resnet8x4", 10), None, (3, 32, 32))
    with pytest.raises(UsageError, match="needs a teacher"):
        build_distiller("reviewkd", create_model("resnet8x4", 10), None, (3, 32, 32))
