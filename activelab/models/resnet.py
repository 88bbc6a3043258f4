"""ResNet-10 and ResNet-18 (basic blocks) with a 32-pixel stem or the ImageNet stem, and MC dropout.

Module names follow torchvision's ``resnet18`` (conv1, bn1, layer1..layer4 of blocks with conv1, bn1, conv2,
bn2, downsample; fc), so with the ImageNet stem a torchvision state dict loads as is (dropout holds no
parameters).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> dropout -> 3x3 conv -> BN, plus the shortcut, then ReLU.

    The dropout (p = 0.25, element-wise, ``nn.Identity`` when disabled) sits between the two convolutions, as
    in wide ResNets; it is off in eval mode and on under MC sampling.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(torch.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class ResNet(nn.Module):
    """A ResNet of basic blocks; ``blocks`` = [1, 1, 1, 1] is ResNet-10, [2, 2, 2, 2] ResNet-18.

    Stems: ``"cifar"`` (3x3 conv, stride 1, no max-pool: for 32-pixel images) or ``"imagenet"`` (7x7 conv,
    stride 2, then 3x3 max-pool stride 2). Taps: layer3 (256 channels) + layer4 (512): L = 768.
    """

    default_taps: ClassVar[list[str]] = ["layer3", "layer4"]
    classifier_name: ClassVar[str] = "fc"

    def __init__(
        self,
        blocks: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        stem: str = "cifar",
        dropout: bool = True,
    ) -> None:
        super().__init__()
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet'; got {stem!r}")
        self.bn1 = nn.BatchNorm2d(64)
        p = 0.25 if dropout else 0.0
        widths = [64, 128, 256, 512]
        in_planes = 64
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            layer = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                layer.append(BasicBlock(in_planes, width, stride, p))
                in_planes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet10(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar", dropout: bool = True) -> ResNet:
    return ResNet([1, 1, 1, 1], num_classes, in_channels, stem, dropout)


def resnet18(num_classes: int = 10, in_channels: int = 3, stem: str = "cifar", dropout: bool = True) -> ResNet:
    return ResNet([2, 2, 2, 2], num_classes, in_channels, stem, dropout)
