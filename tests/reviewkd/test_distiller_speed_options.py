"""The speed options of the ReviewKD distiller (issue 2): the BN-folded teacher, channels_last, and
the reworked ABF fusion, each computing what the plain formulation computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploy.errors import UsageError
from reviewkd import ABF, ReviewKD
from reviewkd.distiller import fold_batchnorm
from reviewkd.models import create_model


def _with_running_stats(model: nn.Module, shape: tuple[int, int, int]) -> nn.Module:
    """Give BatchNorm non-trivial running statistics and affine parameters, as training would."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape, generator=generator))
    return model.eval()


def test_folded_teacher_matches_unfused_logits() -> None:
    teacher = _with_running_stats(create_model("cifar_resnet20", 10), (3, 32, 32))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    folded = fold_batchnorm(teacher, (3, 32, 32))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(images), teacher(images), rtol=1e-5, atol=1e-5)
    for key, value in teacher.state_dict().items():  # the original is untouched
        torch.testing.assert_close(value, before[key], msg=key)


def test_fold_refuses_a_conv_output_read_past_its_batchnorm() -> None:
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.fc((self.bn(y) + y).mean((2, 3)))

    model = _with_running_stats(Branching(), (3, 8, 8))
    with torch.no_grad():
        model.bn.running_var.fill_(4.0)  # make BN far from identity, so folding visibly changes y
    with pytest.raises(UsageError, match="fuse_teacher"):
        fold_batchnorm(model, (3, 8, 8))


def test_reviewkd_fuse_teacher_gives_the_same_losses() -> None:
    shape = (3, 32, 32)
    teacher = _with_running_stats(create_model("cifar_resnet20", 10), shape)
    torch.manual_seed(0)
    plain = ReviewKD(create_model("cifar_resnet20", 10), teacher, input_shape=shape)
    torch.manual_seed(0)
    fused = ReviewKD(create_model("cifar_resnet20", 10), teacher, input_shape=shape, fuse_teacher=True)
    assert fused.teacher is teacher and fused.teacher_fused is not None
    fused.train()
    assert not teacher.training and not fused.teacher_fused.training
    images, targets = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    plain.train()
    out_plain, out_fused = plain(images, targets), fused(images, targets)
    torch.testing.assert_close(out_fused["teacher_logits"], out_plain["teacher_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_fused["loss"], out_plain["loss"], rtol=1e-5, atol=1e-5)
    out_fused["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in fused.teacher_fused.parameters())
    assert not any("teacher" in k for k in fused.student.state_dict())


def test_channels_last_gives_the_same_loss_and_gradients() -> None:
    shape = (3, 32, 32)
    teacher = _with_running_stats(create_model("cifar_resnet20", 10), shape)
    images, targets = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        distiller = ReviewKD(
            create_model("cifar_resnet20", 10), teacher, input_shape=shape, fuse_teacher=True
        )
        x = images
        if channels_last:
            distiller.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            x = images.contiguous(memory_format=torch.channels_last)
        distiller.train()
        out = distiller(x, targets)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad for p in distiller.head.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for grad_cl, grad in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(grad_cl, grad, rtol=1e-3, atol=1e-4)


def _literal_abf(
    abf: ABF, feature: torch.Tensor, residual: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """docs/METHOD.md section 1.2, steps 1-4, with the concatenation written out."""
    x = abf.conv1(feature)
    residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
    assert abf.att_conv is not None
    attention = abf.att_conv(torch.cat([x, residual], dim=1))
    x = x * attention[:, 0:1] + residual * attention[:, 1:2]
    x = F.interpolate(x, size=out_size, mode="nearest")
    return abf.conv2(x)


@pytest.mark.parametrize(
    ("feature_size", "residual_size", "out_size"),
    [
        ((8, 8), (4, 4), (8, 8)),
        ((6, 10), (3, 5), (12, 20)),
        ((5, 7), (2, 3), (5, 7)),
        ((4, 4), (4, 4), (2, 2)),
    ],
)
def test_abf_fusion_matches_the_literal_formula(
    feature_size: tuple[int, int], residual_size: tuple[int, int], out_size: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    abf = ABF(in_channels=5, mid_channels=6, out_channels=7, fuse=True).eval()
    feature = torch.randn(2, 5, *feature_size, requires_grad=True)
    residual = torch.randn(2, 6, *residual_size, requires_grad=True)
    y, fused = abf(feature, residual, out_size)
    expected = _literal_abf(abf, feature, residual, out_size)
    torch.testing.assert_close(y, expected)
    assert fused.shape[-2:] == out_size
    grads = torch.autograd.grad(y.square().sum(), [feature, residual, abf.att_conv[0].weight])  # type: ignore[index]
    expected_grads = torch.autograd.grad(
        expected.square().sum(),
        [feature, residual, abf.att_conv[0].weight],  # type: ignore[index]
    )
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
