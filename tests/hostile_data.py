"""Data factories and model factories that go wrong the ways users' do (for tests/test_hardening.py)."""
from __future__ import annotations

import sys

import torch
from torch import nn


def float_targets(batch_size: int, seed: int = 0, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(batch_size, dim, generator=g), torch.rand(batch_size, generator=g)


def out_of_range(batch_size: int, seed: int = 0, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(batch_size, dim, generator=g), torch.full((batch_size,), 99)


def finite(batch_size: int, seed: int = 0, dim: int = 8, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(batch_size, dim, generator=g), torch.randint(0, 4, (batch_size,), generator=g)


def raises_later(batch_size: int, seed: int = 0, dim: int = 8, n: int = 3):
    yield from finite(batch_size, seed, dim, n)
    raise RuntimeError("the shard server went away")


def val_other_shape(batch_size: int, seed: int = 0, split: str = "train", dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    d = dim if split == "train" else dim + 1
    while True:
        yield torch.randn(batch_size, d, generator=g), torch.randint(0, 4, (batch_size,), generator=g)


def lazy(width: int):
    return nn.Sequential(nn.LazyLinear(width), nn.ReLU(), nn.Linear(width, 4))


def exits(width: int):
    sys.exit(0)


def int_inputs(batch_size: int, seed: int = 0, dim: int = 8):
    """Integer inputs for a float model (a tokenizer's ids fed to an MLP)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, 5, (batch_size, dim), generator=g), torch.randint(0, 4, (batch_size,), generator=g)
