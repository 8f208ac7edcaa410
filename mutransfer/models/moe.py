"""A small pre-LN GPT whose MLPs are mixtures of experts (builtin:moe-gpt), trainable on a CPU in seconds.

Each MoE layer: a router (nn.Linear width -> experts), top-k routing of every token, and the experts'
weights stored as 3-D tensors, one slice per expert, as transformers stores them:
    w_in   (experts, expert_hidden, width)   used as W[e]·x   through torch.bmm
    w_out  (experts, width, expert_hidden)   used as W[e]·a   through torch.einsum ("edh": e batched)
Tokens are dispatched with a fixed capacity per expert (GShard / Switch: capacity_factor x tokens x
top_k / experts slots; the assignments beyond it are dropped, counted in token order so a token's fate
depends only on the tokens before it), so every shape is static: the model runs on the meta device
and its FLOPs are those of the slots it computes (about capacity_factor x top_k/experts of running
every expert on every token).

The forward pass returns {"logits", "aux_loss", "z_loss"}: the load-balancing loss of Switch
Transformer (Fedus et al. 2021, eq. 4: experts x sum_e f_e P_e, 1 when balanced) and the router
z-loss of ST-MoE (Zoph et al. 2022, eq. 5: mean logsumexp(router logits)^2), averaged over layers.
Add them to the objective with the recipe key train.aux_losses: {aux_loss: 0.01, z_loss: 0.001}.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .gpt import Attention, resolve_heads


class MoE(nn.Module):
    def __init__(self, width: int, experts: int, top_k: int, hidden: int, capacity_factor: float,
                 normalize: bool):
        super().__init__()
        self.experts, self.top_k, self.capacity_factor, self.normalize = experts, top_k, capacity_factor, normalize
        self.router = nn.Linear(width, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, hidden, width) / math.sqrt(width))
        self.w_out = nn.Parameter(torch.randn(experts, width, hidden) / math.sqrt(hidden))

    def capacity(self, tokens: int) -> int:
        return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.experts))

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        n, d, e, k = h.shape[0], h.shape[1], self.experts, self.top_k
        logits = self.router(h)
        probs = logits.float().softmax(-1)
        top_p, top_i = probs.topk(k, dim=-1)
        if self.normalize:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        cap = self.capacity(n)
        flat = top_i.reshape(-1)                                       # (n k): token-major order
        onehot = F.one_hot(flat, e)
        pos = (onehot.cumsum(0) - 1).gather(1, flat.unsqueeze(1)).squeeze(1)
        keep = pos < cap
        slot = torch.where(keep, flat * cap + pos, torch.full_like(pos, e * cap))   # dropped: a dump row
        buf = h.new_zeros(e * cap + 1, d).index_add(0, slot, h.repeat_interleave(k, 0))
        xe = buf[: e * cap].view(e, cap, d)
        a = F.gelu(torch.bmm(xe, self.w_in.transpose(1, 2)))           # (e, cap, hidden)
        ye = torch.einsum("ech,edh->ecd", a, self.w_out)               # (e, cap, d)
        rows = torch.cat([ye.reshape(e * cap, d), ye.new_zeros(1, d)])
        w = (top_p.reshape(-1) * keep).to(rows.dtype).unsqueeze(1)
        y = (rows[slot] * w).view(n, k, d).sum(1)
        frac = onehot.float().mean(0)                                  # share of the assignments per expert
        aux = e * (frac * probs.mean(0)).sum()
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return y.view(shape), aux, z


class Block(nn.Module):
    def __init__(self, width: int, heads: int, attn_mult: float, moe: MoE):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, attn_mult, True)
        self.ln2 = nn.LayerNorm(width)
        self.moe = moe

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        y, aux, z = self.moe(self.ln2(x))
        return x + y, aux, z


class MoEGPT(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, vocab: int, seq_len: int, experts: int, top_k: int,
                 expert_ratio: float, capacity_factor: float, normalize: bool, attn_mult: float):
        super().__init__()
        self.seq_len = seq_len
        hidden = max(1, int(round(expert_ratio * width)))
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(
            Block(width, heads, attn_mult, MoE(width, experts, top_k, hidden, capacity_factor, normalize))
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.seq_len}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        aux = z = 0.0
        for b in self.blocks:
            x, a, zz = b(x)
            aux, z = aux + a, z + zz
        n = len(self.blocks)
        return {"logits": self.head(self.ln_f(x)), "aux_loss": aux / n, "z_loss": z / n}


def moe_gpt(width: int, layers: int = 2, heads: int | None = None, head_dim: int | None = None, vocab: int = 256,
            seq_len: int = 64, experts: int = 4, top_k: int = 2, expert_ratio: float = 1.0,
            capacity_factor: float = 1.25, normalize: bool = True, attn_mult: float = 1.0) -> MoEGPT:
    """experts of hidden size expert_ratio x width (grows with width: the width rule applies per
    expert); top_k experts per token, their gates renormalised to sum to 1 unless normalize is false."""
    heads = resolve_heads(width, heads, head_dim, layers, vocab, seq_len)
    if experts < 1 or not 1 <= top_k <= experts:
        raise UserError("model.args.top_k", f"need 1 <= top_k <= experts, got top_k={top_k}, experts={experts}")
    if not capacity_factor > 0 or not expert_ratio > 0:
        raise UserError("model.args", "capacity_factor and expert_ratio must be > 0")
    return MoEGPT(width, layers, heads, vocab, seq_len, experts, top_k, expert_ratio, capacity_factor, normalize,
                  attn_mult)
