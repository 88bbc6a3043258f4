"""LeNet as used by the FK paper on MNIST: two 5x5 convolutions and two linear layers, with MC dropout."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ActivelabError


def _dropout(p: float, enabled: bool) -> nn.Module:
    return nn.Dropout(p) if enabled else nn.Identity()


class PoolReLU(nn.Module):
    """relu(max_pool2d(x, 2)): a module so that its output can be tapped by name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.max_pool2d(x, 2))


class LeNet(nn.Module):
    """conv1 (in->10, 5x5) -> maxpool 2 -> ReLU -> dropout 0.25; conv2 (10->20, 5x5) -> maxpool 2 -> ReLU ->
    dropout 0.25; fc1 (flat->50) -> ReLU -> dropout 0.5; fc2 (50->C), the classifier.

    ``flat`` is 320 for 28x28 images (20 x 4 x 4) and is computed from ``image_size`` otherwise (500 for
    32x32).
    Taps: conv1 (10 channels), conv2 (20), fc1 (50): L = 80 after global average pooling. These are the
    layers' outputs, before pooling and ReLU; the FK authors' code read the activations after them, which are
    the modules ``act1``, ``act2`` (max-pool + ReLU) and ``act3`` (ReLU): ``taps: [act1, act2, act3]``
    reproduces their descriptors. The activation modules have no parameters, so state dicts do not change.
    With ``dropout=False`` the dropout layers are ``nn.Identity`` (module names and state dicts are the
    same).
    """

    default_taps: ClassVar[list[str]] = ["conv1", "conv2", "fc1"]
    classifier_name: ClassVar[str] = "fc2"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: bool = True):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ActivelabError(f"LeNet needs images of at least 16x16 pixels; got {image_size}x{image_size}")
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.act1 = PoolReLU()
        self.drop1 = _dropout(0.25, dropout)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.act2 = PoolReLU()
        self.drop2 = _dropout(0.25, dropout)
        self.fc1 = nn.Linear(20 * side * side, 50)
        self.act3 = nn.ReLU()
        self.drop3 = _dropout(0.5, dropout)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act1(self.conv1(x)))
        x = self.drop2(self.act2(self.conv2(x)))
        x = self.drop3(self.act3(self.fc1(x.flatten(1))))
        return self.fc2(x)
