"""Mixture-of-experts: how the router, the experts and their biases scale with width, with the number
of experts E and with the experts per token k, from the spectral condition (Yang, Simon & Bernstein,
"A Spectral Condition for Feature Learning"; see spectral.py). Pure functions, no torch.

An MoE layer computes  y = sum_{e in topk(r(x))} g_e(x) W_down[e] phi(W_up[e] x),  r(x) = W_r x.

Width. Each expert slice W[e] is an ordinary (fan_out x fan_in) matrix applied to the tokens routed to
it, so the spectral condition ||W[e]||, ||dW[e]|| ~ sqrt(fan_out/fan_in) holds slice by slice: each
slice gets the dense rule for *its* fans (shapes.py reads them from the forward pass; a 3-D stack is not
a matrix with fan_in = the product of its trailing dims). Width transfer needs nothing else, provided
the expert size grows with width like the dense MLP's (hf: `width_fields: {moe_intermediate_size: 1}`).
The router W_r (E x width) is a readout onto E logits: the spectral rule with fans (width, E) gives
muP's readout (init ~ sqrt(E)/width, Adam LR ~ 1/width, eps fixed), as Małaśnicki et al. (arXiv
2508.09752) find; a per-expert bias (E x out) is a stack of vectors, fan_in 1.

Experts and top-k (at a fixed width), assuming the usual normalised top-k gates (they sum to 1, so a
selected expert's gate is ~1/k; Mixtral, DeepSeek-V3, OLMoE-style norm_topk_prob):
  * the layer's output is sum of k terms of size 1/k: Theta(1) in E and k, nothing to rescale. With
    *un*normalised softmax gates (Qwen2-MoE's default norm_topk_prob=false) a gate is ~1/E and the
    routed output shrinks like k/E: growing E then needs an output multiplier E/k, which no
    per-parameter factor provides (moe_output_scale says by how much);
  * an expert receives a share k/E of the tokens, each weighted by its gate ~1/k: its gradient entries
    shrink like (k/E)(1/k) = 1/E (coherent sums, as in the muP limit). Adam normalises that away: LR
    ratio 1 and init ratio 1, but eps ~ 1/E (it must track the gradient's size); SGD's step is the
    gradient, so its LR must grow like E;
  * the router's logit gradient is p_e ~ 1/E per expert, so likewise Adam LR 1, eps ~ 1/E, SGD LR ~ E.
    Its init: we keep each *logit* Theta(1) (init ratio 1 in E), where the spectral rule read with
    fan_out = E would grow it like sqrt(E) (min(1, sqrt(E/width))/sqrt(width)): a softmax over E
    experts compares logits one by one, and sqrt(E)-sized logits would make the initial routing sharper
    with more experts. This is the one place this module departs from reading E as a width.

Where this departs from the literature: Jiang, Bordelon, Hanin & Pehlevan (arXiv 2601.20205) scale E
with the active share kappa = k/E held fixed (k grows with E); here k is fixed and gates are
normalised, the common setting of released models; under their scaling the gradient share is kappa/k
= 1/E as well, so the Adam rules above agree. We have not checked their router/bias tables line by line
(only their stated setting), and the number of experts is not exposed as a recipe axis: it would change
only Adam's eps, and no measurement here supports transferring E (docs/moe.md).
"""
from __future__ import annotations

import math

from .spectral import ADAM, ADAMW, MUON, SGD

EXPERT, ROUTER = "expert", "router"


def _check(experts: int, top_k: int) -> None:
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"need 1 <= top_k <= experts, got experts={experts}, top_k={top_k}")


def active_fraction(experts: int, top_k: int) -> float:
    """Share of the expert weights one token uses (and of the tokens one expert sees): k/E. FLOPs of
    the routed experts are this share of running every expert on every token."""
    _check(experts, top_k)
    return top_k / experts


def gate_size(experts: int, top_k: int, normalized: bool = True) -> float:
    """Typical gate of a selected expert near init (router logits ~equal): 1/k when the top-k gates are
    renormalised to sum to 1, else its softmax probability 1/E."""
    _check(experts, top_k)
    return 1.0 / top_k if normalized else 1.0 / experts


def moe_output_scale(experts: int, top_k: int, normalized: bool = True) -> float:
    """Size of the routed output relative to one expert's: k gates of gate_size each (1 if normalised,
    k/E if not)."""
    return top_k * gate_size(experts, top_k, normalized)


def expert_grad_scale(experts: int, top_k: int, normalized: bool = True) -> float:
    """Size of an expert slice's gradient entries relative to a dense layer's: it sees k/E of the tokens,
    each through its gate: (k/E) x gate_size (= 1/E with normalised gates)."""
    return active_fraction(experts, top_k) * gate_size(experts, top_k, normalized)


def router_grad_scale(experts: int, top_k: int) -> float:
    """Size of the router's gradient entries: d(softmax)_e ~ p_e ~ 1/E per expert logit."""
    _check(experts, top_k)
    return 1.0 / experts


def ratios(base: tuple[int, int], new: tuple[int, int], optimizer: str, kind: str = EXPERT,
           normalized: bool = True) -> tuple[float, float, float]:
    """(init std, LR, eps) ratios from (experts, top_k) = `base` to `new` at a fixed width, for an expert
    slice (or its bias: kind "expert") or the router (kind "router"). See the module docstring."""
    if kind == EXPERT:
        g0, g1 = expert_grad_scale(*base, normalized), expert_grad_scale(*new, normalized)
    elif kind == ROUTER:
        g0, g1 = router_grad_scale(*base), router_grad_scale(*new)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected {EXPERT!r} or {ROUTER!r}")
    grad = g1 / g0
    if optimizer in (ADAM, ADAMW, MUON):
        return 1.0, 1.0, grad           # Adam's step is normalised; eps tracks the gradient
    if optimizer == SGD:
        return 1.0, 1.0 / grad, 1.0     # SGD's step is lr x gradient: lr ~ 1/gradient
    raise ValueError(f"unknown optimizer {optimizer!r}")


def spectral_router_init_ratio(width: int, base_experts: int, experts: int) -> float:
    """What the spectral rule would give the router's init if E were read as its fan_out (for the
    record: ratios() keeps 1 instead): min(1, sqrt(E/width))/sqrt(width) between the two E."""
    f = lambda e: min(1.0, math.sqrt(e / width)) / math.sqrt(width)   # noqa: E731
    return f(experts) / f(base_experts)
