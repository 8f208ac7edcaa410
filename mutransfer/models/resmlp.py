"""A residual MLP: input -> `depth` pre-LN residual blocks x + W2 act(W1 LN(x)) -> LN -> output.
The depth rule's built-in test model (the plain `mlp` is not residual)."""
from __future__ import annotations

from torch import nn

from ..errors import UserError


class Block(nn.Module):
    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, ratio * width)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(ratio * width, width)

    def forward(self, x):
        return x + self.fc_out(self.act(self.fc(self.norm(x))))


class ResMLP(nn.Module):
    def __init__(self, width: int, in_dim: int, out_dim: int, depth: int, ratio: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(Block(width, ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(self.norm(h))


def resmlp(width: int, in_dim: int = 32, out_dim: int = 10, depth: int = 2, ratio: int = 2) -> ResMLP:
    if depth < 1 or ratio < 1 or in_dim < 1 or out_dim < 1:
        raise UserError("model.args", "depth, ratio, in_dim and out_dim must be >= 1")
    return ResMLP(width, in_dim, out_dim, depth, ratio)
