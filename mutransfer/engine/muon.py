"""`optimizer: muon`: torch.optim.Muon for the hidden matrices, AdamW for everything else (embeddings,
readout, biases, gains, conv kernels — torch's Muon takes 2-D matrices only and we do not flatten
kernels), presented to the training loop, the LR schedule and the checkpoints as one optimizer.

Each group carries `optimizer: muon | adamw` and its own lr and weight_decay from the plan, which has
already divided out torch's own shape factor (spectral.torch_muon_factor) and set the decay so that
lr x weight_decay is the proxy's shrink ("independent" decay). weight_decay is always passed
explicitly: torch's Muon defaults to 0.1.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .spectral import MUON


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over two: torch.optim.Muon (groups with optimizer "muon") and torch.optim.AdamW
    (the rest). param_groups is their concatenation (the same dicts: schedules write through), and
    state_dict() is a standard one indexed over that concatenation, so checkpoints and
    torch.distributed.checkpoint see a plain optimizer."""

    def __init__(self, groups: list[dict], hp, adam_kw: dict[str, Any]):
        mu = [g for g in groups if g.get("optimizer") == MUON]
        ad = [g for g in groups if g.get("optimizer") != MUON]
        self.muon = torch.optim.Muon(mu, lr=hp.lr, weight_decay=0.0, momentum=hp.muon_momentum,
                                     nesterov=hp.nesterov, ns_steps=hp.ns_steps) if mu else None
        self.adamw = torch.optim.AdamW(ad, lr=hp.adam_lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                                       weight_decay=0.0, **adam_kw) if ad else None
        self.parts = [o for o in (self.muon, self.adamw) if o is not None]
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    @property
    def state(self) -> dict:
        out: dict = {}
        for o in self.parts:
            out.update(o.state)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.parts:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.parts:
            sd = o.state_dict()
            for k, v in sd["state"].items():
                state[k + offset] = v
            for g in sd["param_groups"]:
                groups.append({**g, "params": [i + offset for i in g["params"]]})
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Split by groups: each part gets its groups and the state of the parameters they list (ids
        may be indices or, from torch.distributed.checkpoint, parameter names)."""
        gi = 0
        for o in self.parts:
            groups = state_dict["param_groups"][gi:gi + len(o.param_groups)]
            keys = {k for g in groups for k in g["params"]}
            o.load_state_dict({"state": {k: v for k, v in state_dict["state"].items() if k in keys},
                               "param_groups": groups})
            gi += len(o.param_groups)
