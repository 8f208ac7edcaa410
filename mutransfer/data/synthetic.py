"""Synthetic data whose teacher is fixed by `teacher_seed` and whose stream is fixed by `seed`.

vectors: Gaussian inputs, labels from a random two-layer teacher network (classification), or its
         outputs (regression, for the mse loss).
images:  small class-conditional images: a fixed random template per class plus Gaussian noise.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..errors import UserError


def _gen(seed: int, split: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 2 + (split == "val") + 12345)


def vectors(batch_size: int, seed: int = 0, split: str = "train", dim: int = 32, classes: int = 10,
            teacher_width: int = 64, task: str = "classification", noise: float = 0.0,
            teacher_seed: int = 1234) -> Iterator:
    if task not in ("classification", "regression"):
        raise UserError("data.args.task", f"unknown task {task!r}; expected classification or regression")
    if dim < 1 or classes < 1 or teacher_width < 1:
        raise UserError("data.args", "dim, classes and teacher_width must be >= 1")
    tg = torch.Generator().manual_seed(teacher_seed)
    w1 = torch.randn(teacher_width, dim, generator=tg) / dim**0.5
    w2 = torch.randn(classes, teacher_width, generator=tg) / teacher_width**0.5
    g = _gen(seed, split)
    while True:
        x = torch.randn(batch_size, dim, generator=g)
        y = torch.tanh(x @ w1.T) @ w2.T
        if noise:
            y = y + noise * torch.randn(y.shape, generator=g)
        yield (x, y.argmax(-1)) if task == "classification" else (x, y)


def images(batch_size: int, seed: int = 0, split: str = "train", size: int = 16, channels: int = 3,
           classes: int = 10, noise: float = 1.0, teacher_seed: int = 1234) -> Iterator:
    if size < 2 or channels < 1 or classes < 1:
        raise UserError("data.args", "size >= 2, channels >= 1 and classes >= 1 are required")
    tg = torch.Generator().manual_seed(teacher_seed)
    templates = torch.randn(classes, channels, size, size, generator=tg)
    # smooth the templates a little so that convolutions have local structure to find
    templates = torch.nn.functional.avg_pool2d(templates, 3, stride=1, padding=1) * 2
    g = _gen(seed, split)
    while True:
        y = torch.randint(0, classes, (batch_size,), generator=g)
        x = templates[y] + noise * torch.randn(batch_size, channels, size, size, generator=g)
        yield x, y
