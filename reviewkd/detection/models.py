"""Detectors by name: torchvision's, and small CPU FCOS detectors for the embedded default.

Every detector is a `Detector`: a torchvision detection model wrapped so that it takes and returns
contiguous class indices 0..K-1, whatever the architecture's convention. That convention is this
module's to know, and nowhere else's: Faster R-CNN and SSD reserve class 0 for the background
(their classifiers have K + 1 outputs and their outputs never hold 0), RetinaNet and FCOS do not
(one sigmoid per class; 0 is a class like any other). torchvision's docs say "including the
background" for all four, after the COCO weights' 91 ids, but RetinaNet's and FCOS's losses and
post-processing treat label 0 as an object.

A Detector also lists its feature levels (`feature_levels`, finest first), in the spirit of timm's
feature_info: the key of each level in its backbone's output dict (the FPN levels, or SSD's
multi-scale maps), the module whose output it is (a path for reviewkd.taps; None for a level a
function computes, such as Faster R-CNN's max-pooled "pool"), and its channels.

Weights are never downloaded: torchvision's builders get weights=None and weights_backbone=None;
a user's file (safetensors, or a torch state_dict read with weights_only=True) holds the
torchvision model's own state_dict (`detector.model.state_dict()`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork

from deploy.errors import UsageError
from reviewkd.models.cifar_resnet import BasicBlock
from reviewkd.models.weights import load_weights

TORCHVISION_PREFIX = "torchvision:"
# torchvision builder name -> whether the architecture reserves class 0 for the background.
TORCHVISION_DETECTORS: dict[str, bool] = {
    "fcos_resnet50_fpn": False,
    "retinanet_resnet50_fpn_v2": False,
    "fasterrcnn_mobilenet_v3_large_fpn": True,
    "fasterrcnn_resnet50_fpn": True,
    "ssdlite320_mobilenet_v3_large": True,
}
# Side of the square probe image that finds a torchvision detector's levels (SSD's last maps need
# at least 64 pixels to stay non-empty).
PROBE_SIDE = 128


@dataclass(frozen=True)
class SmallFcosSpec:
    """A small FCOS detector: a ResNet of BasicBlocks (stem and three stages, each stride 2, so the
    FPN levels sit at strides 4, 8 and 16), a narrow FPN over the three stages, and a head of
    `head_convs` convolutions per branch."""

    stage_widths: tuple[int, int, int]
    fpn_width: int
    head_convs: int


SMALL_DETECTORS: dict[str, SmallFcosSpec] = {
    "fcos_small_teacher": SmallFcosSpec(stage_widths=(32, 64, 128), fpn_width=64, head_convs=2),
    "fcos_small_student": SmallFcosSpec(stage_widths=(16, 32, 64), fpn_width=32, head_convs=2),
}
SMALL_STRIDES = (4, 8, 16)
# torchvision FCOS's default centre-sampling radius, in anchor sides.
FCOS_CENTER_SAMPLING_RADIUS = 1.5


@dataclass(frozen=True)
class FeatureLevel:
    """One level of a detector's backbone output: its dict key, the module path (from the Detector)
    whose output it is, or None where a function computes it, and its channels."""

    key: str
    module: str | None
    channels: int


class Detector(nn.Module):
    """A torchvision detector that takes and returns class indices 0..K-1 (see the module docstring).

    `forward(images, targets)` is the torchvision model's: a list of (3, H, W) images in 0-1 (or a
    batch tensor); in train mode, targets with boxes and labels, giving a dict of losses; in eval
    mode, a list of dicts of boxes, scores and labels.

    Attributes:
        model: the torchvision detection model.
        name: the name it was built by.
        num_classes: K, the classes it tells apart (the model has K + label_offset outputs).
        label_offset: 1 where the architecture reserves class 0 for the background, else 0.
        feature_levels: the backbone's output levels, finest first.
    """

    def __init__(
        self, model: nn.Module, name: str, num_classes: int, label_offset: int, probe_size: tuple[int, int]
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.num_classes = num_classes
        self.label_offset = label_offset
        self.feature_levels = _probe_levels(self, probe_size)

    def forward(self, images: Any, targets: Sequence[dict[str, torch.Tensor]] | None = None) -> Any:
        if targets is not None:
            targets = [{**target, "labels": target["labels"] + self.label_offset} for target in targets]
        output = self.model(images, targets)
        if self.training:
            return output
        return [{**found, "labels": found["labels"] - self.label_offset} for found in output]

    def features(self, images: Any) -> OrderedDict[str, torch.Tensor]:
        """The backbone's output levels for `images`, after the model's own resize and normalisation
        (what its heads see): the teacher's side of feature distillation, without its heads."""
        image_list, _ = self.model.get_submodule("transform")(list(images))
        return OrderedDict(self.model.get_submodule("backbone")(image_list.tensors))


def _probe_levels(detector: Detector, size: tuple[int, int]) -> tuple[FeatureLevel, ...]:
    """Run the backbone on a zero image with every module hooked; a level's module is the outermost
    one that returned that very tensor (a Sequential returns its last child's output)."""
    backbone = detector.model.get_submodule("backbone")
    produced: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []  # so no id() is reused during the probe

    def make_hook(path: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                keep_alive.append(output)
                # hooks fire innermost first, so the outermost module's path is written last
                produced[id(output)] = path

        return hook

    handles = [
        module.register_forward_hook(make_hook(f"model.backbone.{path}"))
        for path, module in backbone.named_modules()
        if path
    ]
    was_training = backbone.training
    parameter = next(iter(backbone.parameters()))
    try:
        backbone.eval()
        with torch.no_grad():
            levels = backbone(torch.zeros((1, 3, *size), device=parameter.device))
    finally:
        backbone.train(was_training)
        for handle in handles:
            handle.remove()
    found = tuple(
        FeatureLevel(key=str(key), module=produced.get(id(value)), channels=int(value.shape[1]))
        for key, value in levels.items()
    )
    keep_alive.clear()
    return found


# --- torchvision's detectors ---------------------------------------------------------------------------


def _torchvision_detector(name: str, num_classes: int, **kwargs: Any) -> Detector:
    arch = name[len(TORCHVISION_PREFIX) :]
    if arch not in TORCHVISION_DETECTORS:
        known = ", ".join(TORCHVISION_PREFIX + n for n in TORCHVISION_DETECTORS)
        raise UsageError(f"detector '{name}' is unknown; torchvision's detectors here: {known}")
    offset = int(TORCHVISION_DETECTORS[arch])
    builder = getattr(detection, arch)
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes + offset, **kwargs)
    return Detector(model, name, num_classes, offset, (PROBE_SIDE, PROBE_SIDE))


# --- small CPU detectors -------------------------------------------------------------------------------


class SmallResNet(nn.Sequential):
    """A stride-2 3x3 stem and three stages of two BasicBlocks, each stage halving the size."""

    def __init__(self, widths: tuple[int, int, int]) -> None:
        stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[tuple[str, nn.Module]] = [("stem", stem)]
        in_width = widths[0]
        for index, width in enumerate(widths, start=1):
            blocks = nn.Sequential(
                BasicBlock(in_width, width, stride=2, shortcut="B"), BasicBlock(width, width)
            )
            stages.append((f"layer{index}", blocks))
            in_width = width
        super().__init__(OrderedDict(stages))


class BackboneFPN(nn.Module):
    """Stage outputs of `body` through a FeaturePyramidNetwork without extra levels: an OrderedDict
    "0", "1", "2" (finest first), each `out_channels` wide, as torchvision's detectors take it."""

    def __init__(
        self, body: nn.Module, return_layers: dict[str, str], in_channels: Sequence[int], out_channels: int
    ):
        super().__init__()
        self.body = IntermediateLayerGetter(body, return_layers=return_layers)
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def small_fcos(
    name: str, num_classes: int, image_size: tuple[int, int], anchor_scale: float = 1.0, **kwargs: Any
) -> Detector:
    """A small FCOS detector (SMALL_DETECTORS[name]) for images of `image_size` (H, W), which its
    transform leaves unresized; other sizes are resized as torchvision's detectors do. `kwargs` go to
    torchvision's FCOS (score_thresh, nms_thresh, detections_per_img, ...).

    `anchor_scale` sets each level's anchor side to its stride times it. torchvision's FCOS assigns a
    box to the levels whose anchors are 4 to 8 times smaller than the box's reach from the cell (no
    lower bound on the finest level, no upper on the coarsest), so with anchors as wide as the
    strides (1.0) every object under 64 pixels lands on the finest level; 0.5 halves those bounds.
    The centre-sampling radius, counted in anchor sides, is divided by it, so in pixels it stays
    torchvision's 1.5 strides."""
    spec = SMALL_DETECTORS[name]
    body = SmallResNet(spec.stage_widths)
    backbone = BackboneFPN(
        body,
        return_layers={f"layer{i}": str(i - 1) for i in (1, 2, 3)},
        in_channels=spec.stage_widths,
        out_channels=spec.fpn_width,
    )
    # FCOS's anchors are its feature cells: one per location, as wide as the level's stride.
    sides = tuple((stride * anchor_scale,) for stride in SMALL_STRIDES)
    anchors = AnchorGenerator(sides, ((1.0,),) * len(SMALL_STRIDES))
    kwargs.setdefault("center_sampling_radius", FCOS_CENTER_SAMPLING_RADIUS / anchor_scale)
    head = FCOSHead(spec.fpn_width, num_anchors=1, num_classes=num_classes, num_convs=spec.head_convs)
    # torchvision's FCOS clamps its box distances with a ReLU, and its zero bias starts half of them
    # at the ReLU's edge; a distance whose output goes negative on every cell gets no gradient again.
    # A positive start (one anchor side, in the normalised targets' units) keeps each one learning.
    nn.init.constant_(head.regression_head.bbox_reg.bias, 1.0)
    height, width = image_size
    model = detection.FCOS(
        backbone,
        num_classes=num_classes,
        min_size=min(height, width),
        max_size=max(height, width),
        anchor_generator=anchors,
        head=head,
        size_divisible=SMALL_STRIDES[-1],
        **kwargs,
    )
    return Detector(model, name, num_classes, label_offset=0, probe_size=image_size)


def list_detectors() -> list[str]:
    """Every name `build_detector` takes."""
    return [TORCHVISION_PREFIX + name for name in TORCHVISION_DETECTORS] + list(SMALL_DETECTORS)


def build_detector(
    name: str,
    num_classes: int,
    weights: str | os.PathLike[str] | None = None,
    image_size: tuple[int, int] = (64, 96),
    anchor_scale: float = 1.0,
    **kwargs: Any,
) -> Detector:
    """Build a detector by name (`list_detectors()`) for `num_classes` classes (indices 0..K-1).

    `weights` is a user's file holding the torchvision model's state_dict, loaded strictly;
    `image_size` (H, W) sizes the small detectors' transform and `anchor_scale` their anchors
    (`small_fcos`); `kwargs` go to the torchvision builder.

    Raises:
        UsageError: an unknown name, num_classes below 1, anchor_scale for a torchvision detector, or
            a weights file that does not fit.
    """
    if num_classes < 1:
        raise UsageError(f"detector '{name}': num_classes is {num_classes}; expected at least 1")
    if name.startswith(TORCHVISION_PREFIX):
        if anchor_scale != 1.0:
            raise UsageError(f"detector '{name}': anchor_scale applies to the small FCOS detectors only")
        detector = _torchvision_detector(name, num_classes, **kwargs)
    elif name in SMALL_DETECTORS:
        detector = small_fcos(name, num_classes, image_size, anchor_scale, **kwargs)
    else:
        raise UsageError(f"detector '{name}' is unknown; expected one of {', '.join(list_detectors())}")
    if weights is not None:
        load_weights(detector.model, weights)
    return detector
