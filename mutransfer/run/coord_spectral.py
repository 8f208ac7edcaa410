"""The spectral condition itself, measured (Yang, Simon & Bernstein, 003_35bb903ebc618867.txt):
for every matrix W (fan_out x fan_in, as the forward pass uses it: the traced layout), ||W||_2 at
init and ||dW||_2 after the check's steps should both go like sqrt(fan_out / fan_in). We record
norm / sqrt(fan_out / fan_in) per width; its log-log slope should be ~0. Activations can hide a
mis-scaled parameter (a position table 4x too small is washed out by the token embedding), its
norm cannot.

fan_in-1 tables (embeddings, position tables, cls tokens) are judged on their mean row norm (the
image of one one-hot input), since ||W||_2 of a vocab x width table carries sqrt(vocab). A
zero-initialised matrix is judged on ||dW||_2 only. Spectral norms come from a few power
iterations from a fixed start: a slope needs consistency across widths, not the third digit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..engine.shapes import fans

ITERS = 12


def as_matrix(p: torch.Tensor, layout: str) -> Optional[torch.Tensor]:
    """W as a (fan_out x fan_in) matrix (rows = one-hot images for tables); None for vectors."""
    if p.dim() < 2 or layout in ("vector", "fixed"):
        return None
    if layout == "embedding":
        return p.reshape(-1, p.shape[-1])
    if layout == "in_out":
        return p.transpose(0, 1).reshape(p.shape[1], -1)
    return p.reshape(p.shape[0], -1)


def spectral_norm(m: torch.Tensor, iters: int = ITERS) -> float:
    m = m.detach().float()
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(m.shape[1], generator=g).to(m.device)
    v = v / v.norm()
    s = 0.0
    for _ in range(iters):
        u = m @ v
        nu = u.norm()
        if nu == 0:
            return 0.0
        v = m.t() @ (u / nu)
        s = float(v.norm())
        if s == 0:
            return 0.0
        v = v / s
    return s


def size(p: torch.Tensor, layout: str) -> Optional[float]:
    """The norm the spectral condition is about: ||W||_2, or the mean row norm for a table."""
    m = as_matrix(p, layout)
    if m is None:
        return None
    if layout == "embedding":
        return float(m.detach().float().norm(dim=1).mean())
    return spectral_norm(m)


def target(fan_in: int, fan_out: int, layout: str) -> float:
    """What the condition prescribes up to a constant: sqrt(fan_out / fan_in) (tables: fan_in 1)."""
    return math.sqrt(fan_out / (1 if layout == "embedding" else fan_in))


class SpectralRecorder:
    """train() callback: W_0 at the start, ||W_0|| and ||W_T - W_0|| against the target at the end.
    `plan` gives each parameter's traced layout and fans."""

    def __init__(self, model: torch.nn.Module, plan):
        self.model, self.plan = model, plan
        self.w0: dict[str, torch.Tensor] = {}
        self.values: dict[str, tuple[float, float]] = {}    # name -> (init ratio, update ratio)

    def _params(self):
        """(name, tensor, layout, fan_in, fan_out) of every matrix, by its *used* layout: a wrong
        `layouts:` declaration is judged against what the forward pass does."""
        for n, p in self.model.named_parameters():
            pp = self.plan.params.get(n)
            if pp is None or pp.role not in ("input", "hidden", "output"):
                continue
            lay = pp.use_layout or pp.layout
            if as_matrix(p, lay) is None:
                continue
            fi, fo = fans(tuple(p.shape), lay)
            yield n, p, lay, fi, fo

    def on_start(self, state) -> None:
        with torch.no_grad():
            self.w0 = {n: p.detach().clone() for n, p, *_ in self._params()}

    def on_end(self, state) -> None:
        with torch.no_grad():
            for n, p, lay, fi, fo in self._params():
                if n not in self.w0:
                    continue
                t = target(fi, fo, lay)
                w0 = size(self.w0[n], lay)
                dw = size(p.detach() - self.w0[n], lay)
                self.values[n] = (w0 / t, dw / t)
        self.w0 = {}
