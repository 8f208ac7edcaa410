"""Several trials as one model: S parametrized copies of the same architecture, their parameters
stacked, trained by THE training loop (train.py) as one model whose forward runs every slot:
`torch.func.vmap` over `functional_call`; for a model vmap refuses, `functional_call` on each slot
in turn; with one slot left, a plain call of the base module, which then holds that slot's
parameters itself. The numbers are the same either way.

A slot is (trial, seed). Each slot keeps its own init (built by the plan with its trial's values and
seed), its own LRs, decay, eps and betas (batched_optim.py) and its own forward multipliers (tied
readouts, residual branches: hooks that read the running slot's value). All parameters live in one
flat tensor (S, N) (row i: slot i's parameters, one after another; Muon's matrices first) and so do
their gradients: every parameter is a leaf viewing it, with its .grad a view of the flat gradient
(autograd accumulates in place, as with DDP's bucket views), so the optimizer is a dozen operations
over one tensor and no gradient is copied. Slots with the same seed see the same data stream (as
trials trained one after another do); when the live slots have several seeds each gets its own rows
of the batch (SlotData).

Nothing is stored on tensors: the plan per slot stays plain data; the stack is this module's.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..engine.hparams import HParams
from ..engine.outputs import select
from ..engine.parametrize import Parametrized
from ..engine.spectral import MUON
from .batched_optim import BatchedOptimizer, slot_grad_clip

# the stacked parameters are strided views of the flat tensor and so are their gradients: autograd
# accumulates into them in place all the same, and says so once per run; nothing to act on
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


@dataclass
class SlotSpec:
    """What a slot is: the parametrized model of one trial at one seed, with the trial's values."""
    built: Parametrized
    hp: HParams
    seed: int


class TrialBatch(nn.Module):
    """S parametrized models of one architecture as one module. forward(x) -> predictions (S, ...).

    `live` lists the slots still in the stack (indices into the original slots): `retain()` drops
    ended ones. `per_slot_input` says whether x has a leading slot dimension (several seeds) or is
    shared by every live slot."""

    def __init__(self, specs: Sequence[SlotSpec], output: Any = None, vectorise: bool = True):
        super().__init__()
        if not specs:
            raise ValueError("no slots")
        base = specs[0].built
        for h in base.hooks:            # the plan's hooks carry slot 0's values: replaced by per-slot ones
            h.remove()
        # not a registered submodule (its own tensors are never used: every call substitutes the stack)
        object.__setattr__(self, "base", base.model)
        self.output = output
        self.vectorise = vectorise
        self.live = list(range(len(specs)))
        self.seeds = [s.seed for s in specs]
        self.starts = [0] * len(specs)           # the loop's iteration each slot joined at
        self.per_slot_input = False
        params, buffers = stack_module_state([s.built.model for s in specs])
        plan0 = specs[0].built.plan
        # Muon's matrices first (batched_optim updates them per matrix, the rest elementwise)
        names = sorted(params, key=lambda n: plan0.params[n].optimizer != MUON)
        self._aliases = _aliases(self.base)
        # parameters the factory froze stay frozen: no gradient, LR 0 (batched_optim then leaves them)
        self.frozen = {n for n, p in self.base.named_parameters() if not p.requires_grad}
        self.layout: list[tuple[str, int, tuple]] = []      # (name, offset, shape) in the flat row
        off = 0
        for n in names:
            self.layout.append((n, off, tuple(params[n].shape[1:])))
            off += params[n][0].numel()
        S = len(specs)
        self._set_flat(torch.cat([params[n].detach().reshape(S, -1) for n in names], 1))
        self._buffers_stacked = {k: v.detach() for k, v in buffers.items()}
        if S == 1:
            _install_buffers(self.base, {k: v[0] for k, v in self._buffers_stacked.items()})
        self.mults = _slot_multipliers(specs)                 # hook key -> tensor (S,)
        self._now: dict[str, torch.Tensor] = {}
        self._hooks = _attach_slot_hooks(self.base, specs[0].built.plan, self)
        self.plans = [s.built.plan for s in specs]
        self.hps = [s.hp for s in specs]

    # ---------------------------------------------------------------- forward ------------------------------

    def train(self, mode: bool = True) -> "TrialBatch":
        super().train(mode)
        self.base.train(mode)
        return self

    def slots(self) -> int:
        return len(self.live)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every parameter as a view of a flat tensor (rows: slots; or one row, without the slot dim)."""
        lead = flat.shape[:-1]
        return {n: flat[..., o:o + math.prod(shape)].view(*lead, *shape) for n, o, shape in self.layout}

    def _set_flat(self, flat: torch.Tensor) -> None:
        """Parameters (and gradients) as views of `flat` (S, N). With one slot left they become the
        base module's own parameters (a plain call: no functional_call on every step)."""
        self.flat = flat.detach().contiguous()
        self.flat_grad = torch.zeros_like(self.flat)
        one = self.flat.shape[0] == 1
        src, grads = (self.flat[0], self.flat_grad[0]) if one else (self.flat, self.flat_grad)
        grads = self.views(grads)
        self.leaves = {}
        for name, view in self.views(src).items():
            leaf = nn.Parameter(view, requires_grad=name not in self.frozen)   # shares the flat storage
            leaf.grad = grads[name]
            self.leaves[name] = leaf
        if one:
            _install(self.base, self.leaves, self._aliases)

    def _one(self, params: dict, buffers: dict, mults: dict, x: torch.Tensor) -> torch.Tensor:
        self._now = mults
        try:
            return select(functional_call(self.base, {**params, **buffers}, (x,)), self.output)
        finally:
            self._now = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.live) == 1:          # the base module holds the slot's parameters itself
            self._now = {k: v[0] for k, v in self.mults.items()}
            try:
                return select(self.base(x[0] if self.per_slot_input else x), self.output).unsqueeze(0)
            finally:
                self._now = {}
        if not self.vectorise:
            outs = []
            for i in range(len(self.live)):
                xi = x[i] if self.per_slot_input else x
                outs.append(self._one({k: v[i] for k, v in self.leaves.items()},
                                      {k: v[i] for k, v in self._buffers_stacked.items()},
                                      {k: v[i] for k, v in self.mults.items()}, xi))
            return torch.stack(outs)
        return vmap(self._one, in_dims=(0, 0, 0, 0 if self.per_slot_input else None),
                    randomness="different")(self.leaves, self._buffers_stacked, self.mults, x)

    # ---------------------------------------------------------------- training helpers ---------------------

    def slot_losses(self, name: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The recipe's loss for every live slot, shape (S,): each the mean over its own batch."""
        return slot_losses(name, out, target, self.per_slot_input)

    def clip_grad_norm_(self, max_norm: float) -> None:
        slot_grad_clip(self.flat_grad, max_norm)

    def retain(self, keep: Sequence[int], optimizer: Optional[BatchedOptimizer] = None) -> None:
        """Keep only the original slots `keep` (a subset of live), in order; their optimizer rows too."""
        rows = [self.live.index(i) for i in keep]
        idx = torch.tensor(rows, dtype=torch.long, device=self.flat.device)
        self._set_flat(self.flat.index_select(0, idx))
        self._buffers_stacked = {k: v.index_select(0, idx) for k, v in self._buffers_stacked.items()}
        self.mults = {k: v.index_select(0, idx) for k, v in self.mults.items()}
        if len(rows) == 1:
            _install_buffers(self.base, {k: v[0] for k, v in self._buffers_stacked.items()})
        self.live = list(keep)
        if optimizer is not None:
            optimizer.retain(rows, self.flat, self.flat_grad)

    def add(self, specs: Sequence[SlotSpec], optimizer: Optional[BatchedOptimizer] = None, at: int = 0) -> list[int]:
        """Append slots (new trials, joining at the loop's iteration `at`): their parameters, buffers,
        forward multipliers and optimizer rows join the stack. Returns their slot ids."""
        params, buffers = stack_module_state([s.built.model for s in specs])
        k = len(specs)
        rows = torch.cat([params[n].detach().reshape(k, -1) for n, _, _ in self.layout], 1)
        ids = list(range(len(self.seeds), len(self.seeds) + k))
        self.seeds += [s.seed for s in specs]
        self.starts += [at] * k
        self.plans += [s.built.plan for s in specs]
        self.hps += [s.hp for s in specs]
        self._set_flat(torch.cat([self.flat, rows.to(self.flat.device, self.flat.dtype)]))
        self._buffers_stacked = _grown(self._buffers_stacked, {n: b.detach() for n, b in buffers.items()})
        self.mults = _grown(self.mults, _slot_multipliers(specs))
        self.live += ids
        if optimizer is not None:
            optimizer.add(self.flat, self.flat_grad, slot_values(self, self.plans[-k:], self.hps[-k:]))
        return ids


def _grown(old: dict, new: dict) -> dict:
    return {k: torch.cat([v, new[k].to(v.device, v.dtype)]) for k, v in old.items()}


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name (as named_parameters gives it) -> every name it has (tied weights: several)."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), name)
        out.setdefault(key, []).append(name)
    return out


def _install(model: nn.Module, leaves: dict[str, nn.Parameter], aliases: dict[str, list[str]]) -> None:
    """Make `leaves` the module's own parameters, under every name each has (ties kept)."""
    modules = dict(model.named_modules())
    for name, leaf in leaves.items():
        for alias in aliases.get(name, [name]):
            mod, _, attr = alias.rpartition(".")
            modules[mod]._parameters[attr] = leaf


def _install_buffers(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, b in buffers.items():
        mod, _, attr = name.rpartition(".")
        modules[mod]._buffers[attr] = b


def _slot_multipliers(specs: Sequence[SlotSpec]) -> dict[str, torch.Tensor]:
    """Per hook site (readout:NAME, branch:NAME) the slots' forward multipliers."""
    dev = next(specs[0].built.model.parameters()).device
    out: dict[str, list[float]] = {}
    for s in specs:
        for mod, m in s.built.plan.readout_multipliers.items():
            out.setdefault("readout:" + mod, []).append(float(m))
        for mod, (m, _) in s.built.plan.branch_multipliers.items():
            out.setdefault("branch:" + mod, []).append(float(m))
    bad = [k for k, v in out.items() if len(v) != len(specs)]
    if bad:
        raise ValueError(f"slots disagree on their forward multipliers at {bad[:3]}")
    return {k: torch.tensor(v, dtype=torch.float32, device=dev) for k, v in out.items()}


class _SlotPre:
    """Forward pre-hook: the readout's input times the running slot's multiplier."""

    def __init__(self, batch: TrialBatch, key: str):
        self.batch, self.key = batch, key

    def __call__(self, module, args):
        m = self.batch._now[self.key]
        return (args[0] * m.to(args[0].dtype),) + tuple(args[1:])


class _SlotPost:
    """Forward hook: a residual branch's output (tensor `index` of a tuple) times the slot's multiplier."""

    def __init__(self, batch: TrialBatch, key: str, index: int):
        self.batch, self.key, self.index = batch, key, index

    def __call__(self, module, args, out):
        m = self.batch._now[self.key]
        if torch.is_tensor(out):
            return out * m.to(out.dtype)
        if isinstance(out, (tuple, list)) and len(out) > self.index and torch.is_tensor(out[self.index]):
            items = list(out)
            items[self.index] = items[self.index] * m.to(items[self.index].dtype)
            return type(out)(items) if isinstance(out, tuple) else items
        return out


def _attach_slot_hooks(model: nn.Module, plan, batch: TrialBatch) -> list:
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(_SlotPre(batch, "readout:" + n))
               for n in plan.readout_multipliers]
    handles += [modules[n].register_forward_hook(_SlotPost(batch, "branch:" + n, idx))
                for n, (_, idx) in plan.branch_multipliers.items()]
    return handles


# ---------------------------------------------------------------- losses and data ----------------------------

def slot_losses(name: str, out: torch.Tensor, target: torch.Tensor, per_slot_target: bool) -> torch.Tensor:
    """Per-slot mean loss of predictions out (S, ...) against a shared target or one per slot (S, ...);
    the same quantity train.loss_fn computes for one model (cross entropy skips index -100 as torch's)."""
    S = out.shape[0]
    if not per_slot_target:
        target = target.unsqueeze(0).expand(S, *target.shape)
    if name == "cross_entropy":
        logits = out.reshape(S, -1, out.shape[-1]).float()
        y = target.reshape(S, -1)
        each = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(S, -1)
        valid = (y != -100).sum(1).clamp(min=1)
        return each.sum(1) / valid
    if name == "mse":
        o = out.float()
        return F.mse_loss(o, target.float().reshape(o.shape), reduction="none").reshape(S, -1).mean(1)
    raise ValueError(f"unknown loss {name!r}")


class SlotData:
    """The training batches of a TrialBatch: one stream per (seed, iteration the slot joined at), so
    each slot reads its seed's stream from its own start, as the trial trained alone would. While
    every live slot reads the same stream the batch is shared (no copy); otherwise each slot gets
    its stream's batch (x, y of shape (S, ...))."""

    def __init__(self, batch: TrialBatch, stream: Callable[[int], Iterator]):
        self.batch, self.stream = batch, stream
        self.streams: dict[tuple[int, int], Iterator] = {}

    def __iter__(self):
        return self

    def __next__(self):
        keys = [(self.batch.seeds[i], self.batch.starts[i]) for i in self.batch.live]
        for k in set(keys) - set(self.streams):
            self.streams[k] = self.stream(k[0])
        for k in set(self.streams) - set(keys):        # no live slot reads it any more
            del self.streams[k]
        now = {k: next(it) for k, it in self.streams.items()}
        if len(now) == 1:
            self.batch.per_slot_input = False
            return now[keys[0]]
        self.batch.per_slot_input = True
        return torch.stack([now[k][0] for k in keys]), torch.stack([now[k][1] for k in keys])


def slot_values(batch: TrialBatch, plans: Sequence, hps: Sequence[HParams]) -> dict[str, torch.Tensor]:
    """The optimizer's values for these slots (their plans and hparams): per element of the flat row
    lr, weight_decay, eps (k, N); per slot beta1, beta2, momentum, muon_momentum (k, 1). Frozen
    parameters get LR 0."""
    k, N, dev = len(plans), batch.flat.shape[1], batch.flat.device

    def per_element(value) -> torch.Tensor:
        out = torch.empty(k, N, dtype=torch.float32, device=dev)
        for name, off, shape in batch.layout:
            col = torch.tensor([float(value(plan.params[name], hp)) for plan, hp in zip(plans, hps)],
                               dtype=torch.float32, device=dev)
            out[:, off:off + math.prod(shape)] = col.view(k, 1)
        return out

    def per_slot(value) -> torch.Tensor:
        return torch.tensor([[float(value(hp))] for hp in hps], dtype=torch.float32, device=dev)

    lr = per_element(lambda q, hp: q.lr)
    for name, off, shape in batch.layout:
        if name in batch.frozen:
            lr[:, off:off + math.prod(shape)] = 0.0
    return {"lr": lr, "initial_lr": lr.clone(), "weight_decay": per_element(lambda q, hp: q.weight_decay),
            "eps": per_element(lambda q, hp: q.eps if q.eps is not None else hp.eps),
            "beta1": per_slot(lambda hp: hp.beta1), "beta2": per_slot(lambda hp: hp.beta2),
            "momentum": per_slot(lambda hp: hp.momentum), "muon_momentum": per_slot(lambda hp: hp.muon_momentum)}


def make_optimizer(batch: TrialBatch, optimizer: str) -> BatchedOptimizer:
    """The batched optimizer over the flat parameter: every element's LR, decay and eps are its slot's
    value for its parameter (the slots' plans); betas and momenta are per slot."""
    group = {"kind": optimizer, **slot_values(batch, batch.plans, batch.hps)}
    if optimizer == MUON:
        plan0 = batch.plans[0]
        mats = [(off, shape[0], shape[1]) for name, off, shape in batch.layout
                if plan0.params[name].optimizer == MUON]
        group.update(nesterov=batch.hps[0].nesterov, ns_steps=batch.hps[0].ns_steps, matrices=mats,
                     muon_cols=sum(r * c for _, r, c in mats))
    return BatchedOptimizer(batch.flat, batch.flat_grad, group)
