"""Batched trials with an optimizer named by class (engine/optimizers.py): batched_optim.py implements
the built-ins over the flat (S, N) parameter; a class of the user's cannot be rewritten that way, so each
slot gets an instance of the class over its own parameters, viewed out of its row of the flat tensor
(and gradients out of the flat gradient: nothing is copied). The forward and backward passes stay
batched (one stacked model); only the optimizer step visits the slots one after another.

It presents the interface the loop and TrialBatch use (param_groups, step, zero_grad, retain, add).
The loop's schedule writes each group's `lr` (a float, or a column (S, 1) when slots are at different
steps); each slot's instance reads its own row of it.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..engine.parametrize import groups_of, make_optimizer


class PerSlotOptimizer:
    def __init__(self, batch, optimizer: str):
        self.batch, self.optimizer = batch, optimizer
        self.opts = [self._make(row) for row in range(batch.flat.shape[0])]

    # ------------------------------------------------------------------ building
    def _params(self, row: int) -> dict[str, nn.Parameter]:
        b = self.batch
        out = {}
        for n, off, shape in b.layout:
            k = math.prod(shape)
            p = nn.Parameter(b.flat[row, off:off + k].view(shape), requires_grad=n not in b.frozen)
            p.grad = b.flat_grad[row, off:off + k].view(shape)
            out[n] = p
        return out

    def _make(self, row: int):
        slot = self.batch.live[row]
        plan, hp = self.batch.plans[slot], self.batch.hps[slot]
        params = self._params(row)
        return make_optimizer(groups_of(params.items(), plan), self.optimizer, hp)

    def _rebind(self, opt, row: int) -> None:
        """Point an instance at its row of a new flat tensor, keeping its state (keyed by parameter)."""
        new = self._params(row)
        for g in opt.param_groups:
            fresh = [new[n] for n in g["names"]]
            for old, p in zip(g["params"], fresh):
                if old in opt.state:
                    opt.state[p] = opt.state.pop(old)
            g["params"] = fresh

    # ------------------------------------------------------------------ the loop's interface
    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts for g in o.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        for row, o in enumerate(self.opts):
            saved = []
            for g in o.param_groups:
                lr = g["lr"]
                if torch.is_tensor(lr):                 # a column: one factor per live slot
                    saved.append((g, lr))
                    g["lr"] = float(lr.reshape(-1)[row] if lr.numel() > 1 else lr)
            o.step()
            for g, lr in saved:
                g["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.batch.flat_grad.zero_()          # the parameters' .grad are views of it (never None)

    def retain(self, rows: Sequence[int], new_flat: torch.Tensor, new_grad: torch.Tensor) -> None:
        self.opts = [self.opts[r] for r in rows]
        for row, o in enumerate(self.opts):
            self._rebind(o, row)

    def add(self, new_flat: torch.Tensor, new_grad: torch.Tensor, values: dict) -> None:
        old = len(self.opts)
        for row, o in enumerate(self.opts):
            self._rebind(o, row)
        self.opts += [self._make(row) for row in range(old, new_flat.shape[0])]

    def state_dict(self) -> dict:
        return {"slots": [o.state_dict() for o in self.opts]}


def trial_optimizer(batch, optimizer: str, builtin: Callable):
    """The batched optimizer for these slots: `builtin(batch, optimizer)` for the built-ins, else one
    instance of the named class per slot."""
    from ..engine.optimizers import batchable

    return builtin(batch, optimizer) if batchable(optimizer) else PerSlotOptimizer(batch, optimizer)
