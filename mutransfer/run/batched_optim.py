"""One optimizer step for S trials at once, over one flat parameter (S, N): row i holds every parameter
of slot i (trial_batch.TrialBatch lays them out), and every hyperparameter is a map of the same shape
(each element: its slot's value for its parameter, from that slot's plan) or a per-slot column (S, 1).

torch's optimizers take one scalar per group, so batched trials need their own; `tune` uses this one
for every trial, one at a time or many (S = 1 is the same code), so the two paths cannot drift. The
formulas are torch's (AdamW, Adam, SGD, Muon), elementwise over the whole flat tensor — a dozen
tensor operations per step whatever the number of parameters and trials:

  AdamW  p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
         p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  Adam   the same with g <- g + wd p (coupled L2) and no decoupled shrink
  SGD    g <- g + wd p;  b <- momentum b + g (b = g at the first step);  p <- p - lr b
  Muon   the first `muon_cols` columns hold the hidden matrices (torch.optim.Muon's step, per matrix,
         batched over slots): p <- p (1 - lr wd); b <- lerp(b, g, 1 - mu); u <- lerp(g, b, mu)
         (Nesterov) or b; O <- Newton-Schulz(u) in bf16; p <- p - lr torch_muon_factor((A, B)) O (= sqrt(max(1, A/B)), spectral.py).
         The remaining columns are AdamW's.

Rows can be dropped (`retain`) when trials end, so finished trials cost nothing afterwards.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..engine.spectral import ADAM, ADAMW, MUON, OPTIMIZERS, SGD, torch_muon_factor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)   # torch.optim.Muon's (Keller Jordan's quintic)
NS_EPS = 1e-7
KINDS = OPTIMIZERS
MAPS = ("lr", "initial_lr", "weight_decay", "eps", "beta1", "beta2", "momentum", "muon_momentum")


def newton_schulz(g: torch.Tensor, steps: int, eps: float = NS_EPS) -> torch.Tensor:
    """Per-slot orthogonalisation of matrices g (S, A, B), as torch.optim.Muon does one matrix."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.transpose(-2, -1)
    x = x / x.flatten(1).norm(dim=1).clamp(min=eps).view(-1, 1, 1)
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.transpose(-2, -1) if tall else x


class BatchedOptimizer:
    """One group over the flat parameter, with the part of torch.optim.Optimizer's interface the
    training loop uses (param_groups, state, step, zero_grad). Not its subclass: the flat parameter and
    per-slot rows fit neither its per-parameter state_dict nor its hooks, and nothing here needs them. `group` holds: kind (adam|adamw|sgd|muon); lr, weight_decay
    (maps (S, N)); eps (S, N) for Adam kinds; beta1, beta2, momentum (S, 1); for muon also
    muon_momentum (S, 1), nesterov, ns_steps, muon_cols and matrices [(offset, rows, cols)] inside
    the first muon_cols columns. The training loop's schedule rewrites `lr` from `initial_lr`."""

    def __init__(self, flat: torch.Tensor, grad: torch.Tensor, group: dict):
        if group.get("kind") not in KINDS:
            raise ValueError(f"unknown optimizer kind {group.get('kind')!r}")
        group = {**group, "params": [flat], "grad": grad}
        for k in ("weight_decay", "eps", "beta1", "beta2", "momentum", "muon_momentum"):
            group[k] = _uniform(group.get(k))      # one value for every element: a float, fewer passes
        group.setdefault("initial_lr", group["lr"])
        group.setdefault("muon_cols", 0)
        self.param_groups = [group]
        self.state: dict = {}

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        p = g["params"][0]
        st = self.state.setdefault(id(p), {})
        kind, grad, m0 = g["kind"], g["grad"], g["muon_cols"]
        st["t"] = [t + 1 for t in st.get("t", [0] * p.shape[0])]     # each row's own step count
        wd = g["weight_decay"]
        if kind in (ADAMW, MUON) and (torch.is_tensor(wd) or wd != 0.0):
            p.mul_(1 - g["lr"] * wd)                          # decoupled ("independent") decay, every column
        if kind == MUON:
            self._muon(p[:, :m0], grad[:, :m0], st, g)
        pe, ge = p[:, m0:], grad[:, m0:]
        if kind in (ADAM, SGD) and (torch.is_tensor(wd) or wd != 0.0):
            ge = ge + _cols(wd, m0) * pe                       # coupled L2
        if kind == SGD:
            self._sgd(pe, ge, st, g)
        else:
            self._adam(pe, ge, st, g, m0)

    # ---------------------------------------------------------------- the rules ---------------------------

    @staticmethod
    def _adam(p, grad, st, g, m0):
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        b1, b2 = g["beta1"], g["beta2"]
        st["exp_avg"].lerp_(grad, 1 - b1)
        if torch.is_tensor(b2):
            st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad * (1 - b2))
        else:
            st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        ts = st["t"]
        lr = g["lr"][:, m0:]
        if all(x == ts[0] for x in ts):
            # every row at the same step: torch's arithmetic (bias corrections as Python numbers)
            t = ts[0]
            denom = st["exp_avg_sq"].sqrt().div_((1 - b2 ** t) ** 0.5).add_(_cols(g["eps"], m0))
            if torch.is_tensor(b1):
                p.addcdiv_(st["exp_avg"] * (lr / (1 - b1 ** t)), denom, value=-1.0)
            else:
                p.addcdiv_(st["exp_avg"] * lr, denom, value=-1.0 / (1 - b1 ** t))
            return
        # rows that joined later (refilled trials) are at steps of their own: per-row bias
        # corrections, computed in float64 as torch computes its Python numbers
        bc1, bc2 = _bias(b1, ts, p), _bias(b2, ts, p)
        denom = st["exp_avg_sq"].sqrt().div_(bc2.sqrt().to(p.dtype)).add_(_cols(g["eps"], m0))
        p.addcdiv_(st["exp_avg"] * (lr / bc1.to(p.dtype)), denom, value=-1.0)

    @staticmethod
    def _sgd(p, grad, st, g):
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = grad.clone()
        else:
            st["momentum_buffer"].mul_(g["momentum"]).add_(grad)
        # momentum 0: the buffer is the gradient itself (torch skips it: the same numbers)
        p.sub_(g["lr"][:, -p.shape[1]:] * st["momentum_buffer"])

    @staticmethod
    def _muon(p, grad, st, g):
        if "muon_buffer" not in st:
            st["muon_buffer"] = torch.zeros_like(p)
        mu = g["muon_momentum"]
        buf = st["muon_buffer"].lerp_(grad, 1 - mu)
        update = grad.lerp(buf, mu) if g["nesterov"] else buf
        S = p.shape[0]
        for off, rows, cols in g["matrices"]:
            n = rows * cols
            o = newton_schulz(update[:, off:off + n].reshape(S, rows, cols), int(g["ns_steps"]))
            lr = g["lr"][:, off:off + 1] * torch_muon_factor((rows, cols))     # as torch.optim.Muon
            p[:, off:off + n].sub_(lr * o.reshape(S, n).to(p.dtype))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient in place: the parameters' .grad are views of it (never set to None)."""
        self.param_groups[0]["grad"].zero_()

    # ---------------------------------------------------------------- rows ---------------------------------

    def retain(self, rows: Sequence[int], new_flat: torch.Tensor, new_grad: torch.Tensor) -> None:
        """Keep only slots `rows` (indices into the current stack); the new flat tensor and gradient
        replace the old (their rows taken from it)."""
        g = self.param_groups[0]
        old = g["params"][0]
        idx = torch.tensor(list(rows), dtype=torch.long, device=old.device)
        for k in MAPS:
            if torch.is_tensor(g.get(k)):
                g[k] = g[k].index_select(0, idx)
        st = self.state.pop(id(old), {})
        self.state[id(new_flat)] = {k: (v.index_select(0, idx) if torch.is_tensor(v) else
                                        [v[i] for i in rows] if k == "t" else v) for k, v in st.items()}
        g["params"], g["grad"] = [new_flat], new_grad

    def add(self, new_flat: torch.Tensor, new_grad: torch.Tensor, values: dict) -> None:
        """Rows for slots appended to the stack (refilled trials): `values` holds their maps and
        columns (as make_optimizer builds them); their moments start at zero and their steps at 0,
        as a fresh optimizer's would (SGD's zero buffer gives the first step's buffer = gradient)."""
        g = self.param_groups[0]
        old = g["params"][0]
        k = new_flat.shape[0] - old.shape[0]
        for key, v in values.items():
            cur = g.get(key)
            if cur is None or not torch.is_tensor(v):
                continue
            if not torch.is_tensor(cur):
                if bool((v == cur).all()):
                    continue                  # still one value for every element
                cur = torch.full((old.shape[0], v.shape[1]), float(cur), dtype=v.dtype, device=v.device)
            g[key] = torch.cat([cur, v])
        st = self.state.pop(id(old), {})
        grown = {}
        for key, v in st.items():
            if key == "t":
                grown[key] = list(v) + [0] * k
            elif torch.is_tensor(v) and v.dim():
                grown[key] = torch.cat([v, v.new_zeros((k, *v.shape[1:]))])
            else:
                grown[key] = v
        self.state[id(new_flat)] = grown
        g["params"], g["grad"] = [new_flat], new_grad


def _uniform(v):
    """A map or column whose elements are all equal, as that float; anything else unchanged."""
    if torch.is_tensor(v) and v.numel() and bool((v == v.flatten()[0]).all()):
        return float(v.flatten()[0])
    return v


def _bias(beta, steps: list, like: torch.Tensor) -> torch.Tensor:
    """1 - beta^t per row, a float64 column (S, 1); beta a float or a per-row column."""
    t = torch.tensor(steps, dtype=torch.float64, device=like.device).view(-1, 1)
    b = beta.double() if torch.is_tensor(beta) else torch.tensor(float(beta), dtype=torch.float64, device=like.device)
    return 1 - b ** t


def _cols(v, start: int):
    """Columns start: of a map; a float or a per-slot column (S, 1) as it is."""
    return v[:, start:] if torch.is_tensor(v) and v.shape[-1] > 1 else v


def slot_grad_clip(grad: torch.Tensor, max_norm: float) -> None:
    """clip_grad_norm_ for each slot on its own: slot i's norm is that of row i of the flat gradient."""
    norm = grad.float().norm(dim=1, keepdim=True)
    grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype))
