"""Optimizers named by class: `train.optimizer: Adafactor` (a torch.optim class) or
`train.optimizer: "package.module:Class"` (Lion, schedule-free AdamW, a project's own fused Muon+AdamW),
with `train.optimizer_kind` (the family of its update, spectral.UPDATE_KINDS; known classes need none)
and `train.optimizer_args` (passed to the constructor).

The plan is made by the family's rule (spectral.update_family) and the class receives the plan's
parameter groups: every group has its own `lr` (and `initial_lr`), `weight_decay` ("independent":
lr x weight_decay is the proxy's at every width, as the class applies decay lr x wd per step) and, where
the class takes a float `eps`, its `eps`; `names` lists the group's parameters. For the orthogonal
family the groups also say `optimizer: "muon" | "adamw"` and `use_muon: True | False` (which
matrices to orthogonalise, as the plan decided), and the muon groups' lr is the step of the
orthogonalised update itself (no shape factor of the class's own: torch.optim.Muon's is divided out
only for torch's class, the built-in `muon`).

The run layer resolves the class (run/recipe.py) and registers it here under the recipe's string,
so every command that passes `recipe.train.optimizer` along (plan, optimizer, hparams files,
checkpoints) works with it unchanged.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from . import spectral
from .hparams import HParams

BUILTIN = spectral.OPTIMIZERS            # sgd, adam, adamw, muon: built by parametrize.make_optimizer

# classes whose family is known (by class name, wherever they come from); anything else must say
KNOWN_KINDS = {
    "Adam": "adam", "AdamW": "adam", "NAdam": "adam", "RAdam": "adam", "Adamax": "adam", "Adagrad": "adam",
    "RMSprop": "adam", "Lion": "sign", "Adafactor": "relative", "SGD": "sgd", "ASGD": "sgd",
    "Muon": "orthogonal",
}


@dataclass(frozen=True)
class OptimizerSpec:
    name: str                  # the recipe's string
    cls: Any                   # the class
    kind: str                  # spectral.UPDATE_KINDS
    args: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return spectral.update_family(self.kind)


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> None:
    _REGISTRY[spec.name] = spec


def get(name: str) -> Optional[OptimizerSpec]:
    return _REGISTRY.get(name)


def family(name: str) -> str:
    """The rule a plan for optimizer `name` follows: a built-in's own name, or a named class's family."""
    if name in BUILTIN:
        return name
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown optimizer {name!r}")
    return spec.family


def relative_step(name: str) -> bool:
    """Whether the class scales its update by the parameter's RMS (the `relative` family)."""
    spec = _REGISTRY.get(name)
    return spec is not None and spec.kind == "relative"


def kind_of(cls: Any) -> Optional[str]:
    """The family of a class known by name (KNOWN_KINDS), else None."""
    for c in getattr(cls, "__mro__", (cls,)):
        k = KNOWN_KINDS.get(getattr(c, "__name__", ""))
        if k is not None:
            return k
    return None


def _accepts(cls: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return {}


def batchable(name: str) -> bool:
    """Whether the batched trial path's own optimizer implements it (built-ins only)."""
    return name in BUILTIN


def adapt_groups(groups: list[dict], spec: OptimizerSpec) -> list[dict]:
    """The plan's groups as this class wants them (module docstring)."""
    params = _accepts(spec.cls)
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    eps_ok = "eps" in params and isinstance(params["eps"].default, float) and "eps" not in spec.args
    out = []
    for g in groups:
        g = dict(g)
        if not eps_ok:
            g.pop("eps", None)
        if spec.kind == "orthogonal" and g.get("optimizer") == "muon":
            # the plan divided torch.optim.Muon's shape factor out; a class of its own applies none: one
            # group per matrix with the factor put back, decay rescaled so that lr x wd is unchanged
            for p, n in zip(g["params"], g["names"]):
                lr = g["lr"] * spectral.torch_muon_factor(tuple(p.shape))
                wd = g["weight_decay"] * g["lr"] / lr if lr else 0.0
                out.append({**g, "params": [p], "names": [n], "lr": lr, "initial_lr": lr, "weight_decay": wd,
                            "use_muon": True})
            continue
        if spec.kind == "orthogonal":
            g["use_muon"] = False
        if "weight_decay" not in params and not has_var_kw:
            if g.get("weight_decay"):
                raise ValueError(f"{spec.name} takes no weight_decay; set train.weight_decay: 0")
        out.append(g)
    return out


def build(groups: list[dict], spec: OptimizerSpec, hp: HParams):
    """The named class over the plan's groups, with the recipe's betas / momentum where it takes them."""
    params = _accepts(spec.cls)
    kw: dict[str, Any] = {}
    if "lr" in params:
        kw["lr"] = hp.lr
    if "betas" in params and isinstance(params["betas"].default, tuple) and len(params["betas"].default) == 2:
        kw["betas"] = (hp.beta1, hp.beta2)
    if "momentum" in params and spec.kind == "sgd":
        kw["momentum"] = hp.momentum
    kw.update(spec.args)
    return spec.cls(adapt_groups(groups, spec), **kw)
