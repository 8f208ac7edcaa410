"""The tunable hyperparameters: what `tune` searches, `scale` transfers and the plan folds in.

Names (usable in `search.params` and in hparams files):
  lr, init_scale, weight_decay, momentum, beta1, beta2, eps, zero_readout, and per-role multipliers
  {input,hidden,output,vector}_{lr,init,mult}:
    ROLE_init  multiplies the init std of that role's weights,
    ROLE_lr    multiplies their learning rate,
    ROLE_mult  is a forward multiplier m (as in mup's output_mult) applied by the abc symmetry:
               init x m and LR x m^2 under SGD; init x m, LR x m, eps / m under Adam(W).
All multipliers default to 1; values are those of the proxy (they transfer unchanged).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Optional

ROLES = ("input", "hidden", "output", "vector", "fixed")
MULTIPLIER_ROLES = ("input", "hidden", "output", "vector")
ADAM_LR_DEFAULT = 1e-3     # optimizer: muon without train.adam_lr: the AdamW LR of non-hidden parameters


@dataclass(frozen=True)
class Tunable:
    """One tunable, declared once: its kind and range (`problem`), whether `sweep` can grid it (a
    positive number, log-spaced), and how it enters the plan: a field of HParams (role None) or the
    multiplier `what` (lr | init | mult) of the weights of `role`."""
    name: str
    range: Literal["positive", "unit", "nonneg", "bool"]   # > 0 | [0, 1) | >= 0 | true/false
    sweepable: bool = False
    role: Optional[str] = None
    what: Optional[str] = None

    @property
    def kind(self) -> type:
        return bool if self.range == "bool" else float

    def problem(self, v: Any) -> Optional[str]:
        """Why `v` is not a value of this tunable ("must be ..."); None when it is one."""
        if self.range == "bool":
            return None if isinstance(v, bool) else "must be true or false"
        if isinstance(v, bool):
            return "must be a number, not true/false"
        if not isinstance(v, (int, float)):
            return "must be a number"
        if not math.isfinite(v):
            return "must be a finite number"
        if self.range == "unit":
            return None if 0 <= v < 1 else "must be in [0, 1)"
        if self.range == "nonneg":
            return None if v >= 0 else "must be >= 0"
        return None if v > 0 else "must be > 0"


TUNABLES: dict[str, Tunable] = {t.name: t for t in (
    Tunable("lr", "positive", sweepable=True),
    Tunable("init_scale", "positive", sweepable=True),
    Tunable("weight_decay", "nonneg", sweepable=True),
    Tunable("momentum", "unit"),
    Tunable("beta1", "unit"),
    Tunable("beta2", "unit"),
    Tunable("eps", "positive", sweepable=True),
    Tunable("zero_readout", "bool"),
    Tunable("adam_lr", "positive"),          # optimizer: muon only, AdamW's LR for the non-hidden parameters
    *(Tunable(f"{r}_{k}", "positive", sweepable=True, role=r, what=k)
      for r in MULTIPLIER_ROLES for k in ("lr", "init", "mult")),
)}
TUNABLE_NAMES = tuple(TUNABLES)
SCALAR_NAMES = tuple(n for n, t in TUNABLES.items() if t.role is None)
MULTIPLIER_NAMES = tuple(n for n, t in TUNABLES.items() if t.role is not None)
SWEEPABLE = tuple(n for n, t in TUNABLES.items() if t.sweepable)


def unknown(name: str) -> str:
    """The message for a name that is not a tunable."""
    return f"unknown tunable {name!r}; known: {', '.join(TUNABLE_NAMES)}"


@dataclass(frozen=True)
class HParams:
    lr: float = 1e-3
    init_scale: float = 1.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    zero_readout: bool = False
    multipliers: dict[str, float] = field(default_factory=dict)
    adam_lr: float = ADAM_LR_DEFAULT     # muon only: AdamW's LR for embeddings, readout, vectors
    muon_momentum: float = 0.95          # muon only (not tunable here; recipe train.muon_momentum)
    nesterov: bool = True
    ns_steps: int = 5

    def mult(self, role: str, kind: str) -> float:
        """Multiplier `kind` (lr|init|mult) of `role`; 1 for roles without multipliers."""
        return float(self.multipliers.get(f"{role}_{kind}", 1.0))

    def with_values(self, values: dict[str, Any]) -> "HParams":
        """A copy with tunables replaced by name (as found in search params or hparams files)."""
        scalars, mults = {}, dict(self.multipliers)
        for k, v in values.items():
            if k not in TUNABLES:
                raise KeyError(k)
            t = TUNABLES[k]
            (scalars if t.role is None else mults)[k] = t.kind(v)
        return replace(self, multipliers=mults, **scalars)

    def flat(self) -> dict[str, Any]:
        d = asdict(self)
        mults = d.pop("multipliers")
        d.update(mults)
        for k in ("muon_momentum", "nesterov", "ns_steps"):
            d.pop(k)
        return d

    @classmethod
    def from_train(cls, train) -> "HParams":
        """From a recipe's `train` section."""
        return cls(
            lr=train.lr,
            init_scale=train.init_scale,
            weight_decay=train.weight_decay,
            momentum=train.momentum,
            beta1=train.betas[0],
            beta2=train.betas[1],
            eps=train.eps,
            zero_readout=train.zero_readout,
            multipliers=dict(train.multipliers),
            adam_lr=train.adam_lr if train.adam_lr is not None else ADAM_LR_DEFAULT,
            muon_momentum=train.muon_momentum,
            nesterov=train.nesterov,
            ns_steps=train.ns_steps,
        )
