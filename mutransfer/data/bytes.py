"""Byte-level language data: the Python standard library's own sources (`pysource`) or any text file
(`text`). Infinite iterators of random windows; the seed fully determines the stream.

format="sequence": (B, seq_len) inputs, (B, seq_len) next-byte targets (for the GPT).
format="window":   (B, context) inputs, (B,) targets: the byte after the window (for the MLP).
"""
from __future__ import annotations

import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError

SPLITS = ("train", "val")


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_val(rel: str, val_fraction: float) -> bool:
    h = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < val_fraction


@lru_cache(maxsize=8)
def _pysource_bytes(split: str, max_bytes: int, val_fraction: float) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for f in _stdlib_files():
        if _is_val(f.relative_to(root).as_posix(), val_fraction) != (split == "val"):
            continue
        try:
            b = f.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    if not chunks:
        raise UserError("data", "no Python standard library sources found on this machine")
    buf = b"\n".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).clone()


@lru_cache(maxsize=8)
def _text_bytes(path: str, split: str, val_fraction: float) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise UserError("data.args.path", f"text file not found: {path}")
    try:
        b = p.read_bytes()
    except OSError as e:
        raise UserError("data.args.path", f"cannot read {path}: {e}") from None
    cut = int(len(b) * (1 - val_fraction))
    b = b[:cut] if split == "train" else b[cut:]
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()


def _stream(data: torch.Tensor, batch_size: int, seed: int, split: str, fmt: str, length: int) -> Iterator:
    if fmt not in ("sequence", "window"):
        raise UserError("data.args.format", f"unknown format {fmt!r}; expected sequence or window")
    if length < 1:
        raise UserError("data.args", "seq_len/context must be >= 1")
    n = data.numel() - length - 1
    if n <= 0:
        raise UserError("data", f"the {split} split has {data.numel()} bytes, too few for windows of {length + 1}")
    g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
    ar = torch.arange(length + 1)
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=g)
        w = data[starts[:, None] + ar].long()
        if fmt == "sequence":
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()
        else:
            yield w[:, :-1].contiguous(), w[:, -1].contiguous()


def pysource(batch_size: int, seed: int = 0, split: str = "train", seq_len: int = 64, format: str = "sequence",
             context: int | None = None, max_bytes: int = 4_000_000, val_fraction: float = 0.1) -> Iterator:
    """Next-byte prediction on the standard library's .py files; train/val split by file."""
    if split not in SPLITS:
        raise UserError("data", f"unknown split {split!r}")
    data = _pysource_bytes(split, max_bytes, val_fraction)
    return _stream(data, batch_size, seed, split, format, context or seq_len if format == "window" else seq_len)


def text(batch_size: int, seed: int = 0, split: str = "train", path: str = "", seq_len: int = 64,
         format: str = "sequence", context: int | None = None, val_fraction: float = 0.1) -> Iterator:
    """Any text file as bytes; the last `val_fraction` of the file is the validation split."""
    if not path:
        raise UserError("data.args.path", "the text source needs a file path")
    if split not in SPLITS:
        raise UserError("data", f"unknown split {split!r}")
    data = _text_bytes(str(Path(path).resolve()), split, val_fraction)
    return _stream(data, batch_size, seed, split, format, context or seq_len if format == "window" else seq_len)
