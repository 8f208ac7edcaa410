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


# ------------------------------------------- the three false alarms of issue 21 (correct models)

class BNResNet(nn.Module):
    """A ResNet-like conv net with BatchNorm (trained with AdamW in the tests): two stem convolutions
    (3 -> width/2 -> width), one residual block of two 3x3 convs, average-pooled linear readout. Adam's
    update of a convolution summed over many positions is high-rank: its operator norm scales like a
    random matrix's while the features it moves stay Theta(1)."""

    def __init__(self, width: int, channels: int, classes: int):
        super().__init__()
        half = width // 2
        self.stem1 = nn.Conv2d(channels, half, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.stem2 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.stem1(x)))
        h = F.relu(self.bn2(self.stem2(h)))
        h = F.relu(h + self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(h))))))
        return self.head(h.mean(dim=(2, 3)))


def bn_resnet(width: int, channels: int = 3, classes: int = 10) -> nn.Module:
    return BNResNet(width, channels, classes)


class SliceGate(nn.Module):
    """An MLP whose hidden units form heads of 16 units; a gate reads a fixed 12-unit slice of the
    first hidden layer and writes one value per head (fan_in 12, fan_out = width / 16), scaling its
    head. The rule's min(1, √(fan_out/fan_in)) changes branch where the heads pass 12."""

    def __init__(self, width: int, in_dim: int, classes: int, head: int = 16, slice_: int = 12):
        super().__init__()
        self.heads, self.head, self.slice = width // head, head, slice_
        self.inp = nn.Linear(in_dim, width)
        self.gate = nn.Linear(slice_, self.heads)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h = F.relu(self.inp(x))
        g = 1 + self.gate(h[:, : self.slice])                      # one value per head
        u = self.hidden(h).view(h.shape[0], self.heads, self.head) * g.unsqueeze(-1)
        return self.out(F.relu(u.reshape(h.shape[0], -1)))


def slice_gate(width: int, in_dim: int = 32, classes: int = 10) -> nn.Module:
    return SliceGate(width, in_dim, classes)


# -------------------------------------------------------------------------------- more of the zoo

def _rotate(x: torch.Tensor) -> torch.Tensor:
    """Rotary positions (RoPE) on the last dimension of (B, H, T, D)."""
    T, D = x.shape[-2], x.shape[-1]
    half = D // 2
    freq = 10000 ** (-torch.arange(half, device=x.device, dtype=x.dtype) / half)
    ang = torch.arange(T, device=x.device, dtype=x.dtype)[:, None] * freq[None]
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., :half], x[..., half: 2 * half]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, x[..., 2 * half:]], dim=-1)


class RopeBlockModel(nn.Module):
    """Correct: a pre-norm transformer with rotary positions, parameter-free norms (no gain, no bias),
    1/d_head attention through SDPA with a fixed head count, and an untied readout."""

    def __init__(self, width: int, heads: int, vocab: int):
        super().__init__()
        self.heads, self.d_head = heads, width // heads
        self.tok = nn.Embedding(vocab, width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.fc = nn.Linear(width, 2 * width)
        self.fc_out = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx)
        B, T, C = x.shape
        h = F.layer_norm(x, (C,))
        q, k, v = (t.view(B, T, self.heads, self.d_head).transpose(1, 2) for t in self.qkv(h).split(C, dim=2))
        a = F.scaled_dot_product_attention(_rotate(q), _rotate(k), v, is_causal=True, scale=1.0 / self.d_head)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        x = x + self.fc_out(F.gelu(self.fc(F.layer_norm(x, (C,)))))
        return self.head(F.layer_norm(x, (C,)))


def rope_muP(width: int, heads: int = 2, vocab: int = 256) -> nn.Module:
    return RopeBlockModel(width, heads, vocab)


class InputMultiplier(_MLP):
    """DEFECT: a hard-coded multiplier sqrt(width / 32) on the input layer's output (before the ReLU)."""

    def forward(self, x):
        h = self.act1(self.inp(x) * self.mult)
        return self.out(self.act2(self.hidden(h)))


def input_multiplier(width: int, in_dim: int = 32, classes: int = 10) -> nn.Module:
    return InputMultiplier(width, in_dim, classes, mult=math.sqrt(width / 32))
