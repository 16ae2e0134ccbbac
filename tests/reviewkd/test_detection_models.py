"""Detectors by name: the small CPU FCOS pair on a non-square batch, torchvision's, the class shift."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from deploy.errors import UsageError
from reviewkd.detection.models import Detector, FeatureLevel, build_detector, list_detectors
from reviewkd.taps import FeatureTaps

IMAGE_SIZE = (64, 96)
NUM_CLASSES = 4


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One thread: the shared CPUs are busy, and small convolutions gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.rand(3, *IMAGE_SIZE), torch.rand(3, *IMAGE_SIZE)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 8.0, 30.0, 40.0], [50.0, 20.0, 70.0, 50.0]]),
            "labels": torch.tensor([0, 3]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # a negative
    ]
    return images, targets


@pytest.mark.parametrize(("name", "width"), [("fcos_small_teacher", 64), ("fcos_small_student", 32)])
def test_a_small_detector_trains_and_detects_on_a_non_square_batch(name: str, width: int) -> None:
    detector = build_detector(name, NUM_CLASSES, image_size=IMAGE_SIZE)
    assert detector.feature_levels == tuple(
        FeatureLevel(str(i), f"model.backbone.fpn.layer_blocks.{i}", width) for i in range(3)
    )
    images, targets = _batch()
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in detector.parameters() if p.requires_grad)
    detector.eval()
    with torch.no_grad():
        found = detector(images)
        levels = detector.features(images)
    assert len(found) == 2 and set(found[0]) == {"boxes", "scores", "labels"}
    assert [tuple(v.shape) for v in levels.values()] == [
        (2, width, 16, 24),
        (2, width, 8, 12),
        (2, width, 4, 6),
    ]


@pytest.mark.parametrize("name", ["fcos_small_teacher", "fcos_small_student"])
def test_every_box_distance_starts_where_its_relu_passes_gradient(name: str) -> None:
    """torchvision's FCOS clamps its four box distances with a ReLU. From a zero bias, the wider
    teacher's left distance went negative on every cell within its first epochs and never learnt again
    (1.8 mAP after 12 epochs against the student's 29). Each distance must start positive almost
    everywhere, so each receives gradient."""
    detector = build_detector(name, NUM_CLASSES, image_size=IMAGE_SIZE)
    outputs: list[torch.Tensor] = []
    reg = detector.model.head.regression_head.bbox_reg
    handle = reg.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    images, targets = _batch()
    detector.train()
    detector(images, targets)
    handle.remove()
    for level in outputs:
        positive = (level > 0).float().mean(dim=(0, 2, 3))  # per distance: left, top, right, bottom
        assert bool((positive > 0.99).all()), positive


def test_the_levels_module_paths_are_taps(tmp_path: Path) -> None:
    detector = build_detector("fcos_small_student", NUM_CLASSES, image_size=IMAGE_SIZE)
    taps = FeatureTaps(detector, [level.module or "" for level in detector.feature_levels], (3, *IMAGE_SIZE))
    assert [(info.channels, info.size) for info in taps.info] == [(32, (16, 24)), (32, (8, 12)), (32, (4, 6))]


def test_teacher_and_student_differ_in_fpn_width() -> None:
    teacher = build_detector("fcos_small_teacher", NUM_CLASSES)
    student = build_detector("fcos_small_student", NUM_CLASSES)
    assert sum(p.numel() for p in student.parameters()) * 3 < sum(p.numel() for p in teacher.parameters())


class _Backbone(nn.Module):
    out_channels = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("0", self.conv(x))])


class _Recorder(nn.Module):
    """Stands in for a torchvision detector: records the targets, answers with fixed labels."""

    def __init__(self, answer: list[int]) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.answer = answer
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, images: Any, targets: Any = None) -> Any:
        if self.training:
            self.seen = targets
            return {"loss": torch.zeros(())}
        return [{"labels": torch.tensor(self.answer)}]


def test_the_background_shift_happens_in_the_wrapper_only() -> None:
    inner = _Recorder(answer=[1, 3])
    detector = Detector(inner, "recorder", num_classes=3, label_offset=1, probe_size=(8, 8))
    detector.train()
    detector([torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([0, 2])}])
    assert inner.seen[0]["labels"].tolist() == [1, 3]  # the model sees 1..K
    detector.eval()
    assert detector([torch.zeros(3, 8, 8)])[0]["labels"].tolist() == [0, 2]  # the caller sees 0..K-1
    assert detector.feature_levels == (FeatureLevel("0", "model.backbone.conv", 2),)


def test_torchvision_faster_rcnn_by_name_reserves_the_background_and_loads_a_users_weights(
    tmp_path: Path,
) -> None:
    name = "torchvision:fasterrcnn_mobilenet_v3_large_fpn"
    detector = build_detector(name, NUM_CLASSES)
    assert detector.label_offset == 1
    assert detector.model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1
    assert [(level.key, level.module) for level in detector.feature_levels] == [
        ("0", "model.backbone.fpn.layer_blocks.0"),
        ("1", "model.backbone.fpn.layer_blocks.1"),
        ("pool", None),
    ]
    file = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in detector.model.state_dict().items()}, str(file))
    again = build_detector(name, NUM_CLASSES, weights=file)
    for key, value in detector.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


def test_a_weights_file_that_does_not_fit_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "student.pt"
    torch.save(build_detector("fcos_small_student", NUM_CLASSES).model.state_dict(), file)
    with pytest.raises(UsageError, match=r"student\.pt does not fit FCOS: .*shape mismatches"):
        build_detector("fcos_small_teacher", NUM_CLASSES, weights=file)


@pytest.mark.parametrize("name", [n for n in list_detectors() if n.startswith("torchvision:")])
def test_every_torchvision_detector_builds_by_name(name: str) -> None:
    # builder options pass through; a smaller resize target than COCO's 800 keeps this quick
    small = {} if "ssdlite" in name else {"min_size": 120, "max_size": 160}
    detector = build_detector(name, NUM_CLASSES, **small)
    offset = 0 if ("fcos" in name or "retinanet" in name) else 1
    assert detector.label_offset == offset
    assert len(detector.feature_levels) >= 3
    detector.eval()
    with torch.no_grad():
        found = detector([torch.rand(3, 120, 160)])
    assert found[0]["boxes"].shape[1] == 4


@pytest.mark.parametrize(
    ("name", "classes", "fragment"),
    [
        ("torchvision:yolo", 3, "detector 'torchvision:yolo' is unknown; torchvision's detectors here:"),
        ("fcos_huge", 3, "detector 'fcos_huge' is unknown; expected one of torchvision:fcos_resnet50_fpn"),
        ("fcos_small_student", 0, "num_classes is 0; expected at least 1"),
    ],
)
def test_bad_names_are_one_line(name: str, classes: int, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        build_detector(name, classes)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def _favour(bias: torch.Tensor, raw_class: int) -> None:
    """Make a classifier's bias put `raw_class` (the torchvision model's own numbering) far above the rest."""
    with torch.no_grad():
        bias.fill_(-20.0)
        bias[raw_class] = 20.0


def test_fcos_outputs_its_raw_class_0_as_an_object() -> None:
    detector = build_detector("fcos_small_student", NUM_CLASSES, image_size=IMAGE_SIZE).eval()
    _favour(detector.model.head.classification_head.cls_logits.bias, 0)
    with torch.no_grad():
        found = detector([torch.rand(3, *IMAGE_SIZE)])[0]
    assert len(found["labels"]) > 0 and set(found["labels"].tolist()) == {0}


def test_faster_rcnn_never_outputs_its_raw_class_0() -> None:
    detector = build_detector(
        "torchvision:fasterrcnn_mobilenet_v3_large_fpn", NUM_CLASSES, min_size=96, max_size=128
    )
    detector.eval()
    bias = detector.model.roi_heads.box_predictor.cls_score.bias
    image = [torch.rand(3, 96, 128)]
    _favour(bias, 0)  # every proposal is background
    with torch.no_grad():
        assert len(detector(image)[0]["labels"]) == 0
    _favour(bias, 1)  # every proposal is the first class, index 0 to the caller
    with torch.no_grad():
        found = detector(image)[0]
    assert len(found["labels"]) > 0 and set(found["labels"].tolist()) == {0}
