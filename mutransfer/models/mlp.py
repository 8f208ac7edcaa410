"""A plain MLP: input -> `depth` hidden layers of size `width` -> output."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    def __init__(self, width: int, in_dim: int, out_dim: int, depth: int = 2, activation: str = "relu",
                 bias: bool = True, vocab: int | None = None, context: int = 1):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.vocab, self.context = vocab, context
        if vocab:
            # integer inputs (B, context): one table row per (position, token), summed. This equals a
            # Linear on concatenated one-hots, but with the embedding's natural fan_in of 1.
            self.inp = nn.Embedding(vocab * context, width)
            self.register_buffer("offsets", torch.arange(context) * vocab, persistent=False)
        else:
            self.inp = nn.Linear(in_dim, width, bias=bias)
        self.hidden = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(depth - 1))
        self.act = act()
        self.out = nn.Linear(width, out_dim, bias=bias)

    def forward(self, x):
        if self.vocab:
            h = self.inp(x + self.offsets).sum(1)
        else:
            h = self.inp(x)
        h = self.act(h)
        for layer in self.hidden:
            h = self.act(layer(h))
        return self.out(h)


def mlp(width: int, in_dim: int = 32, out_dim: int = 10, depth: int = 2, activation: str = "relu",
        bias: bool = True, vocab: int | None = None, context: int = 1) -> MLP:
    """depth = number of hidden layers' worth of nonlinearity (depth - 1 width x width matrices).
    With `vocab`, inputs are (B, context) integer tokens (in_dim is then ignored)."""
    if depth < 1:
        raise UserError("model.args.depth", "must be >= 1")
    if activation not in ACTIVATIONS:
        raise UserError("model.args.activation", f"unknown {activation!r}; known: {', '.join(ACTIVATIONS)}")
    if in_dim < 1 or out_dim < 1:
        raise UserError("model.args", "in_dim and out_dim must be >= 1")
    if vocab is not None and (vocab < 1 or context < 1):
        raise UserError("model.args", "vocab and context must be >= 1")
    return MLP(width, in_dim, out_dim, depth, activation, bias, vocab, context)
