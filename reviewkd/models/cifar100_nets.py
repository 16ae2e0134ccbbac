"""The CIFAR-100 benchmark networks of CRD and ReviewKD: resnet8x4, resnet32x4 and WRN-d-k.

Parameter names follow HobbitLong/RepDistiller (conv1, bn1, layer1..3 with downsample, fc for the
ResNets; conv1, block1..3.layer.N, bn1, fc for the WRNs), so the CRD teacher checkpoints load.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from reviewkd.models.cifar_resnet import BasicBlock


class CifarResNetB(nn.Module):
    """CRD's CIFAR ResNet: a 3x3 stem with filters[0] channels and three stages of basic blocks.

    Depth is 6n+2; resnet8x4 is depth 8 and resnet32x4 depth 32, both with filters (32, 64, 128, 256).
    """

    default_feature_taps: ClassVar[tuple[str, ...]] = ("layer1", "layer2", "layer3", "avgpool")

    def __init__(self, depth: int, filters: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(filters[0], filters[1], n, stride=1)
        self.layer2 = self._make_stage(filters[1], filters[2], n, stride=2)
        self.layer3 = self._make_stage(filters[2], filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride, shortcut="B")]
        layers += [BasicBlock(planes, planes, shortcut="B") for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), any H and W, to logits (N, num_classes)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.avgpool(out), 1))


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    Where the shape changes, the shortcut is a 1x1 conv applied to the pre-activated input, as in the
    reference WRN code.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.convShortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation residual block; relu1 acts on a fresh BN output, never on `x` itself."""
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(pre)))))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class WideStage(nn.Module):
    """A stage of wide blocks, held in `.layer` so parameter names match the reference checkpoints."""

    def __init__(self, blocks: int, in_planes: int, planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, drop_rate)
                for i in range(blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stage's blocks in order."""
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis 2016): depth 6n+4, widths (16, 16k, 32k, 64k), final BN+ReLU.

    Stage outputs (block1..block3) are pre-activation, as in the reference code's default features;
    the final BN+ReLU (bn1, relu) runs before the global pooling.
    """

    default_feature_taps: ClassVar[tuple[str, ...]] = ("block1", "block2", "block3", "avgpool")

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideStage(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideStage(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W), any H and W, to logits (N, num_classes)."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))
