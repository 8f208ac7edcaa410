"""Factories for test_batched_trials: a model torch.func.vmap cannot batch."""
from __future__ import annotations

import torch
from torch import nn


class ItemControlFlow(nn.Module):
    """Branches on a Python number read from the data (.item()): vmap refuses data-dependent control flow."""

    def __init__(self, width: int, in_dim: int, classes: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if h.mean().item() > 1e6:       # never true; vmap cannot know that
            h = h * 0
        return self.out(h)


def item_control_flow(width: int, in_dim: int = 8, classes: int = 4) -> nn.Module:
    return ItemControlFlow(width, in_dim, classes)


def frozen_input(width: int, in_dim: int = 8, classes: int = 4) -> nn.Module:
    """The input layer frozen by the factory (requires_grad False)."""
    m = ItemControlFlow(width, in_dim, classes)
    m.forward = lambda x: m.out(torch.relu(m.inp(x)))
    m.inp.weight.requires_grad_(False)
    return m


class EvalItem(ItemControlFlow):
    """Trains fine under vmap; only its eval-mode forward reads a Python number (.item())."""

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if not self.training and h.mean().item() > 1e6:
            h = h * 0
        return self.out(h)


def eval_item(width: int, in_dim: int = 8, classes: int = 4) -> nn.Module:
    return EvalItem(width, in_dim, classes)
