"""Models written as third parties write them, for the real-model tests: raw parameters used as
x @ W, a ViT-style token model with a cls token and a position table added, a nanoGPT-style model
returning (logits, loss), one returning a Hugging Face-style ModelOutput, and one returning nothing
usable. Each factory takes `width`, as a recipe's model factory does."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class XW(nn.Module):
    """A raw (in, out) matrix used as x @ W, its raw bias, a raw gain and a raw (out, in) readout."""

    def __init__(self, width: int, in_dim: int = 8, classes: int = 10):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(in_dim, width) / in_dim**0.5)      # (in, out): x @ W
        self.b_in = nn.Parameter(torch.zeros(width))
        self.w_hid = nn.Parameter(torch.randn(width, width) / width**0.5)       # (in, out): x @ W
        self.gain = nn.Parameter(torch.ones(width))
        self.w_out = nn.Parameter(torch.randn(classes, width) / width)           # (out, in): F.linear

    def forward(self, x):
        h = torch.relu(x @ self.w_in + self.b_in)
        h = torch.relu(h @ self.w_hid) * self.gain
        return F.linear(h, self.w_out)


def xw(width: int, in_dim: int = 8, classes: int = 10) -> nn.Module:
    return XW(width, in_dim, classes)


class TinyViT(nn.Module):
    """Patches by a conv, a raw cls token concatenated, a raw position table added, one block."""

    def __init__(self, width: int, size: int = 8, patch: int = 4, channels: int = 3, classes: int = 10):
        super().__init__()
        n = (size // patch) ** 2
        self.patch = nn.Conv2d(channels, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 2 * width)
        self.fc_out = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        t = t + self.fc_out(F.gelu(self.fc(self.norm(t))))
        return self.head(t[:, 0])


def tiny_vit(width: int, size: int = 8, classes: int = 10) -> nn.Module:
    return TinyViT(width, size=size, classes=classes)


class NanoGPT(nn.Module):
    """nanoGPT's interface: forward(idx, targets=None) -> (logits, loss), the readout tied to wte,
    and, without targets, logits for the last position only unless `full` is set."""

    def __init__(self, width: int, vocab: int = 256, seq_len: int = 32, full: bool = True):
        super().__init__()
        self.full = full
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(seq_len, width)
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        x = x + self.proj(F.gelu(self.fc(self.ln(x))))
        x = self.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return (self.lm_head(x) if self.full else self.lm_head(x[:, [-1], :])), None


def nanogpt(width: int, vocab: int = 256, seq_len: int = 32, full: bool = True) -> nn.Module:
    return NanoGPT(width, vocab, seq_len, full)


class Output(OrderedDict):
    """A stand-in for transformers' ModelOutput: a dict whose keys are also attributes."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


class DictOut(nn.Module):
    def __init__(self, width: int, vocab: int = 256):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, idx):
        h = torch.relu(self.hidden(self.emb(idx)))
        return Output(hidden_states=h, logits=self.out(h))


def dict_out(width: int, vocab: int = 256) -> nn.Module:
    return DictOut(width, vocab)


class Unusable(DictOut):
    def forward(self, idx):
        return {"h": super().forward(idx)["hidden_states"].sum().item()}


def unusable(width: int, vocab: int = 256) -> nn.Module:
    return Unusable(width, vocab)


def small_vocab_bytes(batch_size: int, seed: int = 0, split: str = "train", seq_len: int = 32, vocab: int = 32):
    """Python-source bytes folded into a small vocabulary (token = byte % vocab)."""
    from mutransfer.data import pysource
    for x, y in pysource(batch_size=batch_size, seed=seed, split=split, seq_len=seq_len):
        yield x % vocab, y % vocab
