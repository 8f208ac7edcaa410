"""Data factories for tests/test_scale.py (imported by recipes as `scale_data:NAME`)."""
import os
import time

import torch

from mutransfer.data import pysource


def slow_pysource(batch_size, seed=0, split="train", seq_len=16, max_bytes=300_000):
    """pysource; with MUTRANSFER_TEST_SLOW_AFTER=N set, every train batch after the N-th takes 0.3 s
    (the stream itself is unchanged), so a test can kill a run in the middle."""
    after = int(os.environ.get("MUTRANSFER_TEST_SLOW_AFTER", "0") or 0)
    for i, b in enumerate(pysource(batch_size, seed, split, seq_len=seq_len, max_bytes=max_bytes)):
        if after and split == "train" and i >= after:
            time.sleep(0.3)
        yield b


def nan_vectors(batch_size, seed=0, dim=8, nan_at=8):
    """Regression on Gaussian vectors whose inputs become NaN from batch `nan_at` on."""
    g = torch.Generator().manual_seed(seed)
    i = 0
    while True:
        x = torch.randn(batch_size, dim, generator=g)
        y = x[:, :1].sin()
        if i >= nan_at:
            x = x * float("nan")
        i += 1
        yield x, y
