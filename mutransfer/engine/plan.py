"""The plan: for every parameter, its init and optimizer settings at one width, as plain data.

Transfer is relative to the proxy: at the proxy width each weight's init std is the spectral rule's
formula times the tunable multipliers, and every LR, eps and weight decay is the global value times its
multipliers; at any other width each is the proxy's value times the rule's ratio (spectral.ratios).
Nothing is attached to tensors; the plan is keyed by parameter name.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from ..errors import UserError
from . import depth as depth_rule
from . import horizon as horizon_rule
from . import optimizers, spectral
from .hparams import HParams
from .shapes import Shapes, stack_shape

MUP, SP = "mup", "sp"


@dataclass(frozen=True)
class ParamPlan:
    name: str
    shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    role: str
    kind: str
    fan_in: int
    fan_out: int
    init: str            # normal | zeros | ones | keep | factory
    init_std: Optional[float]   # std of the initial distribution (0 for constants, None for keep)
    lr: float
    weight_decay: float
    eps: Optional[float]        # None for SGD
    note: Optional[str] = None
    layout: str = "out_in"      # how the parameter is used (shapes.fans); see `source`
    source: str = "module"      # how the layout was decided: module | traced | declared | guessed
    # init "factory": the factory's own tensor, rescaled to (its std at the proxy) x init_factor
    init_factor: Optional[float] = None
    use_layout: Optional[str] = None   # how the forward pass uses it, when a declaration overrode that
    depth_lr: Optional[float] = None   # inside a residual block: the depth rule's LR ratio (else None)
    optimizer: Optional[str] = None    # optimizer: muon only: "muon" (hidden matrices) or "adamw" (the rest)


@dataclass
class Plan:
    width: int
    base_width: int
    optimizer: str
    parametrization: str
    params: dict[str, ParamPlan]
    # readout module name -> forward multiplier on its input (tied embedding / readout)
    readout_multipliers: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # residual branch module -> (multiplier on its output, index of the tensor in the output)
    branch_multipliers: dict[str, tuple[float, int]] = field(default_factory=dict)
    # the horizon and batch axes (horizon.Factors.to_json()): None when the target trains as the proxy
    horizon: Optional[dict] = None

    def to_json(self) -> dict:
        return {
            "width": self.width,
            "base_width": self.base_width,
            "optimizer": self.optimizer,
            "parametrization": self.parametrization,
            "params": [
                {
                    "name": p.name,
                    "shape": list(p.shape),
                    "base_shape": list(p.base_shape),
                    "role": p.role,
                    "fan_in": p.fan_in,
                    "fan_out": p.fan_out,
                    "init_std": p.init_std,
                    "lr": p.lr,
                    "weight_decay": p.weight_decay,
                    "eps": p.eps,
                    "init": p.init,
                    "note": p.note,
                    "layout": p.layout,
                    "stack": list(stack_shape(p.shape, p.layout)),   # stacked layouts: fans are per slice
                    "layout_source": p.source,
                    "init_factor": p.init_factor,
                    "depth_lr": p.depth_lr,
                    "optimizer": p.optimizer,
                }
                for p in self.params.values()
            ],
            "readout_multipliers": dict(self.readout_multipliers),
            "branch_multipliers": {k: v[0] for k, v in self.branch_multipliers.items()},
            "notes": list(self.notes),
            "horizon": self.horizon,
        }

    @property
    def numel(self) -> int:
        return sum(math.prod(p.shape) for p in self.params.values())


def _init_kind(kind: str, layout: str, role: str, zero_readout: bool, source: str = "module") -> str:
    # a traced or declared bias / gain / scale of no known module: its factory value (zeros, ones, a
    # layer-scale 1e-4, Gemma's zero-centred gain) is its meaning; vectors' init does not scale anyway
    if kind in ("bias", "gain") and source != "module":
        return "keep"
    if kind == "bias":
        return "zeros"
    if kind == "gain":
        return "ones"
    # a parameter declared `fixed` has no fans to scale by: it keeps its factory init (whatever its
    # module), as do raw vectors, whose meaning (a gain? a bias? a scale?) the rule cannot know
    if layout == "fixed" or (kind == "raw" and layout == "vector"):
        return "keep"
    if zero_readout and role == "output":
        return "zeros"
    return "normal"


def weight_decay(wd: float, global_lr: float, group_lr: float, m: float, optimizer: str, l2_ratio: float) -> float:
    """The group's weight_decay coefficient.

    AdamW (decoupled) and SGD (L2, whose per-step shrink is also lr * wd): "independent" decay, the
    shrink factor group_lr * wd_group equals global_lr * wd at every width and for every multiplier.
    Adam (coupled L2, normalised with the gradient): wd times the rule's l2 ratio; a forward
    multiplier m turns an L2 penalty on the stored weight into wd / m^2 on the effective one."""
    if optimizer == spectral.ADAM:
        return wd * l2_ratio / (m * m)
    return spectral.independent_weight_decay(wd, global_lr, group_lr)


def at_horizon(hp: HParams, f: horizon_rule.Factors) -> HParams:
    """The proxy's global settings moved to the target's horizon and batch (horizon.py): LR (and
    Muon's AdamW LR) x the horizon and batch factors, decay, eps and betas by their rules. The width
    and depth rules then apply to these values as to the proxy's."""
    vals = {"lr": hp.lr * f.lr, "adam_lr": hp.adam_lr * f.lr, "weight_decay": hp.weight_decay * f.weight_decay,
            "eps": hp.eps * f.eps}
    if f.beta1 is not None:
        vals["beta1"] = f.beta1
    if f.beta2 is not None:
        vals["beta2"] = f.beta2
    return hp.with_values(vals)


def make_plan(shapes: Shapes, hp: HParams, optimizer: str, parametrization: str = MUP,
              factory_init: Union[bool, list[str]] = False,
              depth: Optional[tuple[int, int, float]] = None, muon_params: tuple = (),
              horizon: Optional[horizon_rule.Factors] = None) -> Plan:
    """The per-parameter plan at shapes.width, relative to shapes.base_width.

    factory_init (True, or globs of parameter names): keep the factory's own initialisation at the
    proxy and transfer it by the rule's ratio (init "factory") instead of the rule's formula.

    parametrization="sp" is the control used by coord-check and sweep: identical at the proxy width,
    elsewhere init std ~ 1/sqrt(fan_in) from the proxy's and LR, eps, weight decay fixed.

    depth = (base depth, depth, alpha) applies the depth rule (depth.py) to every parameter inside a
    residual block of shapes.branches, and puts the branch multiplier on every branch's output.

    horizon (horizon.Factors) moves the global settings to the target's horizon and batch first
    (at_horizon); the per-parameter rules then compose with it by multiplication."""
    if horizon is not None:
        hp = at_horizon(hp, horizon)
    rules = optimizers.family(optimizer)     # a built-in's name, or a named class's update family
    if parametrization not in (MUP, SP):
        raise ValueError(f"unknown parametrization {parametrization!r}")
    muon = rules == spectral.MUON
    opt_rules = spectral.ADAMW if muon else rules     # everything Muon does not update is AdamW's
    relative = optimizers.relative_step(optimizer)   # Adafactor-like: the class scales updates by RMS(W)
    adam = opt_rules in (spectral.ADAM, spectral.ADAMW)
    globs = [] if isinstance(factory_init, bool) else list(factory_init)
    for where, patterns in (("factory_init", globs), ("train.muon_params", list(muon_params))):
        for g in patterns:      # one rule for every glob field: a pattern that matches nothing is a mistake
            if not any(fnmatch.fnmatchcase(n, g) for n in shapes.params):
                some = ", ".join(list(shapes.params)[:4]) + (", ..." if len(shapes.params) > 4 else "")
                raise UserError(f"{where}: {g}", f"this pattern matches no parameter of the model ({some})")
    tied_params = set(shapes.tied_readouts.values())
    out: dict[str, ParamPlan] = {}
    notes: list[str] = []
    in_block = shapes.branches.block_params(shapes.params) if (depth and shapes.branches) else {}
    if depth:
        d_lr = depth_rule.lr_ratio(depth[0], depth[1], depth[2], opt_rules)
        d_eps = depth_rule.eps_ratio(depth[0], depth[1], depth[2])
        d_l2 = depth_rule.l2_ratio(depth[0], depth[1], depth[2])
    for name, s in shapes.params.items():
        role = s.role
        base_fans, fans = (s.base_fan_in, s.base_fan_out), (s.fan_in, s.fan_out)
        if parametrization == MUP:
            std_r, lr_r, eps_r = spectral.ratios(base_fans, fans, opt_rules)
            if relative:
                lr_r /= std_r        # spectral.UPDATE_KINDS "relative": entries ~ lr x init std
        else:
            std_r, lr_r, eps_r = math.sqrt(s.base_fan_in / s.fan_in), 1.0, 1.0
        m = hp.mult(role, "mult")
        init = _init_kind(s.kind, s.layout, role, hp.zero_readout and name not in tied_params, s.source)
        factor = None
        if init in ("normal", "zeros") and (factory_init is True or any(fnmatch.fnmatchcase(name, g) for g in globs)):
            init, std, factor = "factory", None, hp.init_scale * hp.mult(role, "init") * m * std_r
        elif init == "normal":
            std = spectral.init_std(*base_fans) * hp.init_scale * hp.mult(role, "init") * m * std_r
        elif init in ("zeros", "ones"):
            std = 0.0
        else:
            std = None
        blk = name in in_block
        by_muon = muon and len(s.shape) == 2 and s.layout in ("out_in", "in_out") and (
            role == "hidden" or (role in ("input", "output") and any(fnmatch.fnmatchcase(name, g) for g in muon_params)))
        base_lr = hp.adam_lr if muon and not by_muon else hp.lr
        if by_muon:
            # Muon's step: effective eta = group lr x torch's shape factor; the rule sets the effective eta
            # ~ sqrt(fan_out/fan_in) relative to the proxy, where the group lr is the plain value
            plain = hp.lr * hp.mult(role, "lr") * m
            if parametrization == MUP:
                eff = plain * spectral.torch_muon_factor(s.base_shape) * (
                    spectral.muon_lr_scale(*fans) / spectral.muon_lr_scale(*base_fans))
                lr = eff / spectral.torch_muon_factor(s.shape)
            else:
                lr = plain
            lr *= (d_lr if blk else 1.0)
            eps = None
            wd = spectral.independent_weight_decay(hp.weight_decay, hp.lr, lr)
        else:
            lr = base_lr * hp.mult(role, "lr") * (m if adam else m * m) * lr_r * (d_lr if blk else 1.0)
            eps = hp.eps * eps_r / m * (d_eps if blk else 1.0) if adam else None
            wd = weight_decay(hp.weight_decay, base_lr, lr, m, opt_rules,
                              (spectral.l2_ratio(base_fans, fans) if parametrization == MUP else 1.0)
                              * (d_l2 if blk else 1.0))
        note = spectral.mup_departure(role, *fans)     # the target's own fans only
        if name in tied_params:
            note = ("tied: embedding rule; the readout's input is multiplied by 1/width in the forward pass "
                    "(its input is aligned with the table)")
        out[name] = ParamPlan(name, s.shape, s.base_shape, role, s.kind, s.fan_in, s.fan_out,
                              init, std, lr, wd, eps, note, s.layout, s.source, factor, s.use_layout,
                              (d_lr if blk else None), ("muon" if by_muon else "adamw") if muon else None)

    readout_mults: dict[str, float] = {}
    for mod_name, pname in shapes.tied_readouts.items():
        s = shapes.params[pname]
        # the readout uses the table as a (vocab x d) matrix whose input is aligned with it: the
        # multiplier is 1/d at every width (spectral.tied_readout_multiplier), whatever the vocabulary.
        # SP (the control) keeps the proxy's 1/d_proxy at every width.
        d = s.shape[-1] if parametrization == MUP else s.base_shape[-1]
        # the table carries the embedding's forward multiplier input_mult (abc: folded into its init);
        # the readout must not see it, and gets the output role's init and forward multipliers instead
        readout_mults[mod_name] = (spectral.tied_readout_multiplier(d) * hp.mult("output", "init")
                                   * hp.mult("output", "mult") / hp.mult("input", "mult"))
        if hp.zero_readout:
            notes.append(f"zero_readout ignored for {mod_name}: its weight is tied to embedding {pname}")
    branch_mults: dict[str, tuple[float, int]] = {}
    if depth and shapes.branches:
        mult = depth_rule.branch_multiplier(depth[0], depth[1], depth[2])
        if mult != 1.0:
            branch_mults = {b: (mult, i) for b, i in shapes.branches.modules.items()}
    return Plan(shapes.width, shapes.base_width, optimizer, parametrization, out, readout_mults, notes, branch_mults,
                horizon.to_json() if horizon is not None else None)
