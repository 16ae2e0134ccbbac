"""ReviewKD for detectors: a small FCOS student under a wider teacher, one step at a time, non-square."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from deploy.errors import UsageError
from reviewkd.abf import ABF
from reviewkd.detection.distiller import DetectionReviewKD, PlainDetection
from reviewkd.detection.models import build_detector

IMAGE_SIZE = (64, 96)
NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, *IMAGE_SIZE, generator=generator) for _ in range(2)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 8.0, 30.0, 40.0], [50.0, 20.0, 80.0, 50.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.tensor([[4.0, 4.0, 24.0, 30.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def _distiller() -> DetectionReviewKD:
    teacher = build_detector("fcos_small_teacher", NUM_CLASSES, image_size=IMAGE_SIZE)
    student = build_detector("fcos_small_student", NUM_CLASSES, image_size=IMAGE_SIZE)
    return DetectionReviewKD(student, teacher, IMAGE_SIZE, hcl_weight=1.0)


def test_the_chain_maps_student_widths_to_the_teachers_coarsest_first() -> None:
    distiller = _distiller()
    assert distiller.student_keys == distiller.teacher_keys == ["0", "1", "2"]
    assert distiller.head.teacher_sizes == [(16, 24), (8, 12), (4, 6)]
    abfs = list(distiller.head.abfs)
    assert [abf.conv1[0].in_channels for abf in abfs] == [32, 32, 32]
    assert [abf.conv2[0].out_channels for abf in abfs] == [64, 64, 64]
    # only the coarsest level starts the chain without a residual to fuse
    assert [abf.att_conv is None for abf in abfs] == [False, False, True]


def test_one_step_trains_student_and_head_and_leaves_the_teacher_unchanged() -> None:
    distiller = _distiller()
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    head_before = {k: v.clone() for k, v in distiller.head.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01)
    distiller.train()
    assert not distiller.teacher.training and distiller.student.training
    images, targets = _batch()
    out = distiller(images, targets)
    assert {"loss", "hcl", "detection", "classification", "bbox_regression", "bbox_ctrness"} <= set(out)
    assert out["loss"].item() == pytest.approx((out["detection"] + out["hcl"]).item(), rel=1e-6)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    teacher_after = distiller.teacher.state_dict()
    assert all(torch.equal(teacher_after[k], v) for k, v in teacher_before.items())  # BN statistics too
    assert all(p.grad is None for p in distiller.teacher.parameters())
    changed = [k for k, v in distiller.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.startswith("model.backbone.") for k in changed) and any(
        k.startswith("model.head.") for k in changed
    )
    assert any(not torch.equal(v, head_before[k]) for k, v in distiller.head.state_dict().items())


def test_steps_on_one_batch_lower_the_hcl_and_detection_terms() -> None:
    distiller = _distiller()
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    distiller.train()
    images, targets = _batch()
    hcl, detection = [], []
    for _ in range(5):
        out = distiller(images, targets)
        hcl.append(out["hcl"].item())
        detection.append(out["detection"].item())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert hcl == sorted(hcl, reverse=True) and hcl[-1] < hcl[0]
    assert detection[-1] < detection[0]


def test_the_bare_student_holds_no_abf() -> None:
    distiller = _distiller()
    fresh = build_detector("fcos_small_student", NUM_CLASSES, image_size=IMAGE_SIZE)
    assert not any(isinstance(module, ABF) for module in distiller.student.modules())
    assert distiller.student.state_dict().keys() == fresh.state_dict().keys()


def test_a_batch_of_another_non_square_size_is_reviewed_at_its_own_sizes() -> None:
    distiller = _distiller()
    distiller.train()
    images = [torch.rand(3, 80, 48), torch.rand(3, 72, 40)]  # taller than wide, resized by the transform
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 30.0]]), "labels": torch.tensor([0])}] * 2
    out = distiller(images, targets)
    assert torch.isfinite(out["loss"])


def test_the_plain_baseline_is_the_detectors_own_losses() -> None:
    student = build_detector("fcos_small_student", NUM_CLASSES, image_size=IMAGE_SIZE)
    plain = PlainDetection(student).train()
    out = plain(*_batch())
    own = out["classification"] + out["bbox_regression"] + out["bbox_ctrness"]
    assert out["loss"].item() == pytest.approx(own.item(), rel=1e-6)
    assert plain.teacher is None and not list(plain.head.parameters())


def test_levels_that_cannot_pair_are_one_line() -> None:
    teacher = build_detector("fcos_small_teacher", NUM_CLASSES, image_size=IMAGE_SIZE)
    student = build_detector("fcos_small_student", NUM_CLASSES, image_size=IMAGE_SIZE)
    with pytest.raises(UsageError, match="has no feature level 'p6'; its levels: 0, 1, 2"):
        DetectionReviewKD(student, teacher, IMAGE_SIZE, teacher_levels=["1", "p6"])
    with pytest.raises(UsageError, match=r"2 levels vs 3; name lists of equal length"):
        DetectionReviewKD(student, teacher, IMAGE_SIZE, student_levels=["1", "2"])
