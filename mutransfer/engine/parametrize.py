"""Apply a plan to a real model: initialise it, attach tied-readout multipliers, build the optimizer.

    model, optimizer, plan = mutransfer.parametrize(factory, width=1024, base_width=128,
                                                    hparams=HParams(lr=3e-3), optimizer="adamw")

The plan is returned as plain data; nothing is stored on tensors, so the model works unchanged with
DDP, FSDP2 (build the optimizer after sharding with `param_groups`) and torch.compile.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import UserError
from . import optimizers
from .branches import BranchScale
from .hparams import HParams
from .muon import MuonAdamW
from .plan import MUP, Plan, at_horizon, make_plan
from .shapes import Shapes, infer_shapes
from .spectral import ADAMW, MUON, SGD


@dataclass
class Parametrized:
    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer]     # None when built with_optimizer=False
    plan: Plan
    hooks: list = field(default_factory=list)   # handles of the plan's forward multipliers (removable)

    def __iter__(self):  # model, optimizer, plan = parametrize(...)
        return iter((self.model, self.optimizer, self.plan))


def build_model(factory: Callable, width: int, args: dict[str, Any], device: str | torch.device = "cpu",
                skip_init: bool = False) -> nn.Module:
    """factory(width=width, **args) on `device`.

    skip_init=True (every parameter is about to be re-initialised): build on the meta device and only
    allocate, skipping the factory's own init (it would be thrown away; for a large model it is most
    of the build time). Models with buffers (a buffer's values come from the constructor) or with a
    parameter shared between modules (to_empty would untie it) are still built for real."""
    try:
        if skip_init:
            with torch.device("meta"):
                meta = factory(width=width, **args)
            shared = len(list(meta.named_parameters(remove_duplicate=False))) != len(list(meta.parameters()))
            if isinstance(meta, nn.Module) and not shared and next(meta.buffers(), None) is None:
                return meta.to_empty(device=device)
        with torch.device(device):
            model = factory(width=width, **args)
    except Exception as e:  # noqa: BLE001
        raise UserError("model", f"factory failed at width {width}: {type(e).__name__}: {e}") from None
    except SystemExit as e:
        raise UserError("model.factory", f"the factory called sys.exit({e.code!r}) at width {width}") from None
    return model


@torch.no_grad()
def factory_stds(factory: Callable, width: int, args: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """Std of every parameter of a fresh factory(width) (seeded): the proxy's reference for init
    "factory". A constant tensor has std 0 (it then stays the factory's constant at every width)."""
    torch.manual_seed(seed)
    model = build_model(factory, width, args, "cpu")
    return {n: (float(p.detach().float().std()) if p.numel() > 1 else 0.0) for n, p in model.named_parameters()}


@torch.no_grad()
def init_model(model: nn.Module, plan: Plan, seed: int = 0, proxy_stds: Optional[dict[str, float]] = None) -> None:
    """Initialise every parameter as the plan says, in name order, from a generator seeded by `seed`.
    Parameters with init "factory" keep the factory's tensor, rescaled so that its std is the same
    tensor's std at the proxy (`proxy_stds`, from factory_stds) times the plan's init_factor."""
    params = dict(model.named_parameters())
    missing = set(plan.params) - set(params)
    if missing:
        raise ValueError(f"plan names parameters the model lacks: {sorted(missing)[:5]}")
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in sorted(params.items()):
        pp = plan.params[name]
        if pp.init == "keep":
            continue
        if pp.init == "factory":
            if proxy_stds is None or name not in proxy_stds:
                raise ValueError(f"{name}: init 'factory' needs the proxy's stds (factory_stds)")
            now = float(p.detach().float().std()) if p.numel() > 1 else 0.0
            if now > 0 and proxy_stds[name] > 0:
                p.mul_(proxy_stds[name] * pp.init_factor / now)
            continue
        if pp.init == "zeros":
            p.zero_()
        elif pp.init == "ones":
            p.fill_(1.0)
        else:
            dev = p.device
            if dev not in gens:
                gens[dev] = torch.Generator(device=dev)
            g = gens[dev]
            g.manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))
            p.normal_(0.0, pp.init_std, generator=g)
    # nn.Embedding(padding_idx=i) promises a zero row i, as its own reset_parameters does
    for mod in model.modules():
        if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
            mod.weight[mod.padding_idx].zero_()


def _stable_hash(s: str) -> int:
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) % (2**64)
    return h


def attach_readout_multipliers(model: nn.Module, plan: Plan) -> list:
    """Tied embedding/readout: the readout's input is multiplied by the plan's multiplier in the
    forward pass (a forward pre-hook), since one tensor cannot carry two init rules. Residual
    branches (depth transfer): each branch's output is multiplied by its depth multiplier."""
    handles = []
    modules = dict(model.named_modules())
    for mod_name, mult in plan.readout_multipliers.items():
        handles.append(modules[mod_name].register_forward_pre_hook(_Scale(mult)))
    for mod_name, (mult, index) in plan.branch_multipliers.items():   # the depth rule's (L_base/L)^alpha
        handles.append(modules[mod_name].register_forward_hook(BranchScale(mult, index)))
    return handles


class _Scale:
    def __init__(self, m: float):
        self.m = float(m)

    def __call__(self, module, args):
        return (args[0] * self.m,) + tuple(args[1:])


def param_groups(model: nn.Module, plan: Plan) -> list[dict]:
    """Optimizer parameter groups: parameters sharing (lr, weight_decay, eps) go in one group, so
    fused/foreach kernels see few groups. Each group carries `initial_lr` for schedules and the names
    of its parameters under `names`."""
    return groups_of(model.named_parameters(), plan)


def groups_of(named_params, plan: Plan) -> list[dict]:
    """param_groups over any (name, parameter) pairs (a model's, or one stacked trial's views)."""
    groups: dict[tuple, dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        pp = plan.params[name]
        key = (pp.lr, pp.weight_decay, pp.eps, pp.optimizer)
        g = groups.setdefault(key, {"params": [], "names": [], "lr": pp.lr, "initial_lr": pp.lr,
                                    "weight_decay": pp.weight_decay})
        if pp.optimizer is not None:
            g["optimizer"] = pp.optimizer
        if pp.eps is not None:
            g["eps"] = pp.eps
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def make_optimizer(groups: list[dict], optimizer: str, hp: HParams, device: Optional[torch.device] = None,
                   fused: Optional[bool] = None) -> torch.optim.Optimizer:
    spec = optimizers.get(optimizer)
    if spec is not None:                 # a class named in train.optimizer (engine/optimizers.py)
        return optimizers.build(groups, spec, hp)
    if fused is None:
        fused = device is not None and torch.device(device).type == "cuda"
    kw: dict[str, Any] = {}
    if optimizer == SGD:
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum,
                               foreach=True if device is None or torch.device(device).type == "cpu" else None)
    if fused:
        kw["fused"] = True
    elif device is None or torch.device(device).type == "cpu":
        kw["foreach"] = True   # torch defaults to a per-tensor Python loop on CPU
    if optimizer == MUON:
        return MuonAdamW(groups, hp, kw)
    cls = torch.optim.AdamW if optimizer == ADAMW else torch.optim.Adam
    return cls(groups, lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, **kw)


def parametrize(
    factory: Callable,
    width: int,
    base_width: int,
    hparams: Optional[HParams] = None,
    optimizer: str = ADAMW,
    args: Optional[dict[str, Any]] = None,
    layouts: Optional[dict[str, str]] = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    parametrization: str = MUP,
    shapes: Optional[Shapes] = None,
    example: Any = None,
    factory_init: bool | list[str] = False,
    depth: Optional[tuple[int, int, float]] = None,
    muon_params: tuple = (),
    with_optimizer: bool = True,
    horizon=None,
) -> Parametrized:
    """Build `factory(width=width, **args)`, initialise it by the spectral rule relative to
    `base_width`, and return it with its optimizer and per-parameter plan. `shapes` may be passed
    when already inferred (infer_shapes for the same factory, args, widths and layouts). `example`, a
    model input, lets width inference trace how parameters of no known module are used.
    `factory_init` (True or globs) keeps the factory's own init at the proxy, transferred by ratio.
    with_optimizer=False leaves Parametrized.optimizer None (a caller with its own, e.g. batched trials).
    `horizon` (horizon.Factors) moves the optimizer's settings to the target's horizon and batch."""
    hp = hparams or HParams()
    args = args or {}
    if shapes is None:
        shapes = infer_shapes(factory, args, base_width, width, layouts, example=example)
    plan = make_plan(shapes, hp, optimizer, parametrization, factory_init, depth, tuple(muon_params), horizon)
    if horizon is not None:
        hp = at_horizon(hp, horizon)     # the optimizer's own betas / momentum follow the plan's values
    proxy_stds = None
    if any(p.init == "factory" for p in plan.params.values()):
        proxy_stds = factory_stds(factory, base_width, args, seed)
    torch.manual_seed(seed)
    skip = all(p.init not in ("keep", "factory") for p in plan.params.values())
    model = build_model(factory, width, args, device, skip_init=skip)
    init_model(model, plan, seed, proxy_stds)
    hooks = attach_readout_multipliers(model, plan)
    opt = make_optimizer(param_groups(model, plan), optimizer, hp, device) if with_optimizer else None
    return Parametrized(model, opt, plan, hooks)
