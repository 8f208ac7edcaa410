"""A small pre-LN GPT decoder (nanoGPT-shaped) whose width is the model dimension.

Attention logits are scaled by attn_mult / d_head (muP), not 1/sqrt(d_head): query and key become
correlated during training, so their dot product grows like d_head, not sqrt(d_head).
Give either `heads` (fixed count; d_head grows with width) or `head_dim` (fixed; heads grow).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, attn_mult: float, bias: bool):
        super().__init__()
        self.heads, self.d_head = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.scale = attn_mult / self.d_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, self.d_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, attn_mult: float, bias: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, bias=bias)
        self.attn = Attention(width, heads, attn_mult, bias)
        self.ln2 = nn.LayerNorm(width, bias=bias)
        self.fc = nn.Linear(width, mlp_ratio * width, bias=bias)
        self.fc_out = nn.Linear(mlp_ratio * width, width, bias=bias)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, vocab: int, seq_len: int, mlp_ratio: int = 4,
                 attn_mult: float = 1.0, tied: bool = False, bias: bool = True):
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, attn_mult, bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=bias)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx):
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.seq_len}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def resolve_heads(width: int, heads: int | None, head_dim: int | None, layers: int, vocab: int, seq_len: int) -> int:
    """The head count from `heads` or `head_dim` (default 4 heads), checked against the width; the other
    sizes checked >= 1. Shared by the built-in transformers (gpt, moe-gpt)."""
    if (heads is None) == (head_dim is None):
        if heads is None:
            heads = 4
        else:
            raise UserError("model.args", "give either heads or head_dim, not both")
    if head_dim is not None:
        if head_dim < 1 or width % head_dim:
            raise UserError("model.args.head_dim", f"head_dim ({head_dim}) must divide the width ({width})")
        heads = width // head_dim
    if heads < 1 or width % heads:
        raise UserError("model.args.heads", f"heads ({heads}) must divide the width ({width})")
    if layers < 1 or vocab < 1 or seq_len < 1:
        raise UserError("model.args", "layers, vocab and seq_len must be >= 1")
    return heads


def gpt(width: int, layers: int = 2, heads: int | None = None, head_dim: int | None = None, vocab: int = 256,
        seq_len: int = 64, mlp_ratio: int = 4, attn_mult: float = 1.0, tied: bool = False,
        bias: bool = True) -> GPT:
    heads = resolve_heads(width, heads, head_dim, layers, vocab, seq_len)
    return GPT(width, layers, heads, vocab, seq_len, mlp_ratio, attn_mult, tied, bias)
