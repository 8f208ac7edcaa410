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

from dataclasses import asdict, dataclass, field, replace
from typing import Any

ROLES = ("input", "hidden", "output", "vector", "fixed")
MULTIPLIER_ROLES = ("input", "hidden", "output", "vector")
MULTIPLIER_NAMES = tuple(f"{r}_{k}" for r in MULTIPLIER_ROLES for k in ("lr", "init", "mult"))
SCALAR_NAMES = ("lr", "init_scale", "weight_decay", "momentum", "beta1", "beta2", "eps", "zero_readout", "adam_lr")
ADAM_LR_DEFAULT = 1e-3     # optimizer: muon without train.adam_lr: the AdamW LR of non-hidden parameters
TUNABLE_NAMES = SCALAR_NAMES + MULTIPLIER_NAMES


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
        scalars = {k: v for k, v in values.items() if k in SCALAR_NAMES}
        mults = dict(self.multipliers)
        for k, v in values.items():
            if k in MULTIPLIER_NAMES:
                mults[k] = float(v)
            elif k not in SCALAR_NAMES:
                raise KeyError(k)
        if "zero_readout" in scalars:
            scalars["zero_readout"] = bool(scalars["zero_readout"])
        for k in set(scalars) - {"zero_readout"}:
            scalars[k] = float(scalars[k])
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
