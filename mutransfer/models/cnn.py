"""A small conv net for images: conv stem -> `blocks` residual conv blocks -> pooled linear readout.
Width is the channel count."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import UserError


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv(F.relu(self.norm(x)))


class CNN(nn.Module):
    def __init__(self, width: int, in_channels: int, classes: int, blocks: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*(ResBlock(width) for _ in range(blocks)))
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.blocks(F.relu(self.stem(x)))
        h = F.relu(self.down(h))
        return self.head(h.mean(dim=(2, 3)))


def cnn(width: int, in_channels: int = 3, classes: int = 10, blocks: int = 2) -> CNN:
    if in_channels < 1 or classes < 1 or blocks < 0:
        raise UserError("model.args", "in_channels and classes must be >= 1, blocks >= 0")
    return CNN(width, in_channels, classes, blocks)
