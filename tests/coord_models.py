"""Models for the coordinate-check tests: width-dependent defects that no re-initialisation can fix
(they sit in the forward pass or in buffers the parametrization never touches), and correct models
of unusual shapes. Each factory takes `width`, as a recipe's model factory does."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------ attention (sequences of tokens)

class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, sqrt_scale: bool):
        super().__init__()
        self.heads, self.d_head = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # the defect: 1/sqrt(d_head) (standard practice); muP needs 1/d_head because q and k become
        # correlated during training, so q.k grows like d_head
        self.scale = 1 / math.sqrt(self.d_head) if sqrt_scale else 1 / self.d_head
        self.logits = nn.Identity()   # hook point: the attention logits

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, self.d_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        att = self.logits(q @ k.transpose(-2, -1) * self.scale)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, C))


class _Transformer(nn.Module):
    def __init__(self, width: int, heads: int, vocab: int, seq_len: int, sqrt_scale: bool):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.ln1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads, sqrt_scale)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 2 * width)
        self.fc_out = nn.Linear(2 * width, width)
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        x = x + self.attn(self.ln1(x))
        x = x + self.fc_out(F.gelu(self.fc(self.ln2(x))))
        return self.head(self.ln_f(x))


def attn_sqrt_dhead(width: int, heads: int = 1, vocab: int = 256, seq_len: int = 32) -> nn.Module:
    """DEFECT: attention logits scaled 1/sqrt(d_head) with a fixed number of heads."""
    return _Transformer(width, heads, vocab, seq_len, sqrt_scale=True)


def attn_muP(width: int, heads: int = 1, vocab: int = 256, seq_len: int = 32) -> nn.Module:
    """Correct: the same transformer with 1/d_head attention."""
    return _Transformer(width, heads, vocab, seq_len, sqrt_scale=False)


# ----------------------------------------------------------------------------- MLPs (vector inputs)

class _MLP(nn.Module):
    def __init__(self, width: int, in_dim: int, classes: int, mult: float = 1.0):
        super().__init__()
        self.width, self.mult = width, mult
        self.inp = nn.Linear(in_dim, width)
        self.hidden = nn.Linear(width, width)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.out = nn.Linear(width, classes)

    def features(self, x):
        h = self.act1(self.inp(x))
        return self.act2(self.hidden(h) * self.mult)


class WidthMultiplier(_MLP):
    """DEFECT: a hard-coded forward multiplier sqrt(width / 32) on a hidden layer's output."""

    def forward(self, x):
        return self.out(self.features(x))


def width_multiplier(width: int, in_dim: int = 32, classes: int = 10) -> nn.Module:
    return WidthMultiplier(width, in_dim, classes, mult=math.sqrt(width / 32))


class _GroupReadout(nn.Module):
    """A parameter-free readout: the hidden units split into `classes` groups, each group pooled."""

    def __init__(self, width: int, in_dim: int, classes: int, pool: str):
        super().__init__()
        self.classes, self.pool = classes, pool
        self.inp = nn.Linear(in_dim, width)
        self.hidden = nn.Linear(width, width)

    def forward(self, x):
        h = torch.tanh(self.hidden(torch.tanh(self.inp(x))))
        g = h.view(h.shape[0], self.classes, -1)
        # the defect is .sum (grows with the group size, i.e. with width); .mean is the muP readout
        return g.sum(-1) if self.pool == "sum" else g.mean(-1)


def sum_readout(width: int, in_dim: int = 32, classes: int = 8) -> nn.Module:
    """DEFECT: a sum instead of a mean over the width dimension (a group-pooled readout)."""
    return _GroupReadout(width, in_dim, classes, "sum")


def mean_readout(width: int, in_dim: int = 32, classes: int = 8) -> nn.Module:
    """Correct: the same model with a mean (1/width readout, as muP asks)."""
    return _GroupReadout(width, in_dim, classes, "mean")


class FixedReadout(nn.Module):
    """DEFECT: a fixed random readout (a buffer, which no parametrization re-initialises) scaled
    1/sqrt(width) as in the standard parametrization; muP needs 1/width. Its output moves like
    sqrt(width) once the hidden features align with it."""

    def __init__(self, width: int, in_dim: int, classes: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.hidden = nn.Linear(width, width)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("readout", torch.randn(width, classes, generator=g) / math.sqrt(width))

    def forward(self, x):
        return F.relu(self.hidden(F.relu(self.inp(x)))) @ self.readout


def fixed_readout(width: int, in_dim: int = 32, classes: int = 10) -> nn.Module:
    return FixedReadout(width, in_dim, classes)


# ------------------------------------------------------------------- correct models, unusual shapes

class Unequal(nn.Module):
    """Hidden widths width -> 3 width -> width / 2, GELU, no biases on the middle layer."""

    def __init__(self, width: int, in_dim: int, classes: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.up = nn.Linear(width, 3 * width, bias=False)
        self.down = nn.Linear(3 * width, width // 2)
        self.out = nn.Linear(width // 2, classes)

    def forward(self, x):
        return self.out(F.gelu(self.down(F.gelu(self.up(F.gelu(self.inp(x)))))))


def unequal(width: int, in_dim: int = 32, classes: int = 10) -> nn.Module:
    return Unequal(width, in_dim, classes)


class ResMLP(nn.Module):
    """Pre-LN residual MLP blocks with an expansion factor of 2."""

    def __init__(self, width: int, in_dim: int, classes: int, blocks: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h = self.inp(x)
        for n, u, d in zip(self.norms, self.ups, self.downs):
            h = h + d(F.relu(u(n(h))))
        return self.out(h)


def resmlp(width: int, in_dim: int = 32, classes: int = 10, blocks: int = 2) -> nn.Module:
    return ResMLP(width, in_dim, classes, blocks)


class ConvNet(nn.Module):
    """Convolutions with unequal channel counts (width / 2, then width), a strided 3x3 conv with a
    1x1 residual branch, BatchNorm, and a 1x1 conv, average-pooled into a linear readout."""

    def __init__(self, width: int, channels: int, classes: int):
        super().__init__()
        half = width // 2
        self.stem = nn.Conv2d(channels, half, 3, padding=1)
        self.bn = nn.BatchNorm2d(half)
        self.conv = nn.Conv2d(half, width, 3, padding=1, stride=2)
        self.skip = nn.Conv2d(half, width, 1, stride=2, bias=False)
        self.mix = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = self.skip(h) + F.relu(self.conv(h))
        h = h + self.mix(F.relu(h))
        return self.head(F.relu(h).mean(dim=(2, 3)))


def convnet(width: int, channels: int = 3, classes: int = 10) -> nn.Module:
    return ConvNet(width, channels, classes)


# ------------------------------------------------------------------------------------------- data

def repeats(batch_size: int, seed: int = 0, split: str = "train", vocab: int = 16, seq_len: int = 16):
    """Token sequences made of a random half repeated once (predict the next token): attention has
    something to learn, and a small vocabulary makes every probe token one seen in training."""
    g = torch.Generator().manual_seed(seed * 2 + (split == "val") + 777)
    half = (seq_len + 2) // 2
    while True:
        a = torch.randint(0, vocab, (batch_size, half), generator=g)
        s = torch.cat([a, a], 1)[:, : seq_len + 1]
        yield s[:, :-1], s[:, 1:]
