"""A small CNN for 8x8 single-channel digits (scikit-learn's ``load_digits``): fast on a CPU."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ActivelabError


class DigitsCNN(nn.Module):
    """conv1 (in->16, 3x3, pad 1) -> ReLU; conv2 (16->32, 3x3, pad 1) -> ReLU -> maxpool 2 -> dropout 0.25;
    fc1 (32·(s/2)²->64) -> ReLU -> dropout 0.5; fc2 (64->C), the classifier.

    Taps: conv1 (16 channels), conv2 (32), fc1 (64): L = 112.
    About 38k parameters for 8x8 inputs and 10 classes.
    """

    default_taps: ClassVar[list[str]] = ["conv1", "conv2", "fc1"]
    classifier_name: ClassVar[str] = "fc2"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, dropout: bool = True):
        super().__init__()
        side = image_size // 2
        if side < 1:
            raise ActivelabError(f"digits_cnn needs images of at least 2x2 pixels; got {image_size}x{image_size}")
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.drop1 = nn.Dropout(0.25) if dropout else nn.Identity()
        self.fc1 = nn.Linear(32 * side * side, 64)
        self.drop2 = nn.Dropout(0.5) if dropout else nn.Identity()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.drop1(torch.max_pool2d(torch.relu(self.conv2(x)), 2))
        x = self.drop2(torch.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)
