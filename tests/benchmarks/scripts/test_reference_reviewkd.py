"""benchmarks/scripts/reference_reviewkd.py: the official-style ReviewKD computes what ours computes,
so the step benchmark times two implementations of the same thing."""

from __future__ import annotations

import copy

import torch

from benchmarks.scripts.reference_reviewkd import OfficialDistillation, official_hcl
from reviewkd import ReviewKD, hcl_loss
from reviewkd.models import create_model


def test_official_style_hcl_agrees_with_ours_on_square_maps() -> None:
    generator = torch.Generator().manual_seed(3)
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 1, 1)]
    s = [torch.randn(shape, generator=generator) for shape in shapes]
    t = [torch.randn(shape, generator=generator) for shape in shapes]
    torch.testing.assert_close(official_hcl(s, t), hcl_loss(s, t))


def test_official_style_step_gives_our_loss_and_gradients_with_the_same_weights() -> None:
    shape = (3, 32, 32)
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet20", 10).eval()
    student = create_model("cifar_resnet20", 10)
    ours = ReviewKD(copy.deepcopy(student), teacher, input_shape=shape, hcl_weight=0.7)
    reference = OfficialDistillation(copy.deepcopy(student), teacher, shape, hcl_weight=0.7)
    # The reference's ABF list runs deepest first, ours shallowest first.
    levels = len(ours.head.abfs)
    assert len(reference.model.abfs) == levels == 4
    for level, abf in enumerate(ours.head.abfs):
        reference.model.abfs[levels - 1 - level].load_state_dict(abf.state_dict())
    ours.train()
    reference.model.train()

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, *shape, generator=generator)
    targets = torch.randint(0, 10, (4,), generator=generator)
    ours_loss = ours(images, targets)["loss"]
    reference_loss = reference.loss(images, targets)
    torch.testing.assert_close(ours_loss, reference_loss, rtol=1e-5, atol=1e-6)

    ours_loss.backward()
    reference_loss.backward()
    ours_grads = dict(ours.student.named_parameters())
    for name, param in reference.model.student.named_parameters():
        assert param.grad is not None and ours_grads[name].grad is not None, name
        torch.testing.assert_close(ours_grads[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)
    for level, abf in enumerate(ours.head.abfs):
        theirs = dict(reference.model.abfs[levels - 1 - level].named_parameters())
        for name, param in abf.named_parameters():
            torch.testing.assert_close(
                param.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=f"{level}.{name}"
            )
    assert all(p.grad is None for p in teacher.parameters())
