"""The horizon and batch rules, as pure functions: tune a proxy that trains *short* on *small* batches,
train a target that trains long on big ones. No torch here.

The width and depth rules make a parameter's settings independent of the model's shape. Nothing makes
them independent of how long and on what batches the model trains: the optimal LR falls as the run
grows, even under muP, and the best decay coefficient depends on the run's length. These rules say
how the proxy's *global* settings move from the proxy's run (S0 steps of B0 samples) to the target's
(S steps of B samples). They compose with the width and depth rules by multiplication (plan.py).

    LR against horizon, at a fixed batch:    eta x (S / S0) ** -gamma
        The optimal LR falls as a power of the token horizon D (Bjorck et al., "Scaling Optimal LR
        Across Token Horizons", ICLR 2025; under muP too; HyperP, arXiv 2603.28743, fits
        eta* ~ D ** -0.32). gamma depends on the model, the data and the schedule, and short runs do
        not follow the law of long ones, so `tune` measures it on the proxy (report/horizon_fit.py);
        DEFAULT_HORIZON_EXPONENT is used only when nothing was measured, and says so.
    LR against batch size, at a fixed number of steps:  eta x (B / B0) ** beta
        The square-root rule for Adam (Malladi et al., "On the SDEs and scaling rules for adaptive
        gradient algorithms", NeurIPS 2022) and the linear rule for SGD (Goyal et al. 2017) keep the
        trajectory at a fixed number of *samples*: B -> kB with k times fewer steps. At a fixed
        number of steps the run also sees k times more samples, and the horizon rule takes back
        k ** -gamma, so the exponent at fixed steps is  beta = 1/2 - gamma (Adam, AdamW, Muon, whose
        orthogonalised update is as scale-free as Adam's; evidence for Muon is thin) and
        beta = 1 - gamma (SGD). Both hold below the critical batch only (McCandlish et al. 2018;
        it grows with the data, not the model: Zhang et al., ICLR 2025); above it the best LR
        stops growing, which no rule here knows: measure it on the proxy (`target.measure`).
    Weight decay (decoupled: AdamW, SGD's L2, Muon): keep the EMA timescale of the weights a fixed
        fraction of the run, tau = 1 / (eta * lambda * S) (Wang & Aitchison, "How to set AdamW's weight
        decay as you scale model and dataset size", ICML 2025; Power Lines, NeurIPS 2025):
        lambda x (eta0 * S0) / (eta * S). Adam's coupled L2 is a term of the loss, not a timescale:
        unchanged.
    Warmup: a fixed fraction of the run (warmup x S / S0), or fixed in steps.
    Adam's eps: it must stay below the root of the second moment, whose noise part falls as
        1 / sqrt(B): eps x sqrt(B0 / B) (the SDE rule of Malladi et al.). The betas are kept by
        default: their timescales (10 and 1000 steps) are counted in steps, which the LR rule
        already accounts for; `betas: half_life` keeps instead their half-life in samples,
        beta ** (B / B0) (Marek et al., "Small batch size training for language models", 2025).

At the proxy's horizon and batch every factor is 1: the model is today's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

# eta* ~ D ** -0.32: HyperP (arXiv 2603.28743), a muP transformer family; used only when nothing was
# measured on the proxy
DEFAULT_HORIZON_EXPONENT = 0.32
ADAM_LIKE = ("adam", "adamw", "muon")
DECOUPLED_DECAY = ("adamw", "sgd", "muon")
DECAY_RULES = ("tau", "fixed")
WARMUP_RULES = ("fraction", "fixed")
EPS_RULES = ("sqrt", "fixed")
BETAS_RULES = ("keep", "half_life")


def _positive(**kw) -> None:
    for k, v in kw.items():
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{k} must be a finite number > 0, got {v!r}")


def horizon_lr_ratio(steps0: int, steps: int, exponent: float) -> float:
    """LR at S steps over the LR at S0 steps (same batch): (S / S0) ** -gamma."""
    _positive(steps0=steps0, steps=steps)
    return (steps / steps0) ** (-exponent)


def default_batch_exponent(optimizer: str, horizon_exponent: float) -> float:
    """beta at a fixed number of steps: the sample-count rule (Adam 1/2, SGD 1) less the horizon's
    gamma, since at fixed steps a k-times bigger batch also sees k times more samples. Never below 0."""
    if optimizer in ADAM_LIKE:
        base = 0.5
    elif optimizer == "sgd":
        base = 1.0
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    return max(0.0, base - horizon_exponent)


def batch_lr_ratio(batch0: int, batch: int, exponent: float) -> float:
    """LR at batch B over the LR at batch B0 (same steps): (B / B0) ** beta."""
    _positive(batch0=batch0, batch=batch)
    return (batch / batch0) ** exponent


def decay_ratio(optimizer: str, lr_ratio: float, steps0: int, steps: int, rule: str = "tau") -> float:
    """lambda at the target over the proxy's. "tau": the decoupled shrink's timescale 1/(eta lambda)
    stays the same fraction of the run, lambda x 1 / (lr_ratio * S / S0); "fixed": 1. Adam's coupled L2: 1."""
    _positive(lr_ratio=lr_ratio, steps0=steps0, steps=steps)
    if rule not in DECAY_RULES:
        raise ValueError(f"unknown decay rule {rule!r}")
    if rule == "fixed" or optimizer not in DECOUPLED_DECAY:
        return 1.0
    return 1.0 / (lr_ratio * steps / steps0)


def decay_timescale(lr: float, weight_decay: float, steps: int) -> float:
    """The decoupled decay's EMA timescale as a fraction of the run, tau = 1 / (eta lambda S). Above 1 the
    decay acts on a longer span than the run: a proxy's lambda tuned there is barely measured, and the
    tau rule transfers it as barely acting (measured: docs/horizon.md)."""
    if lr <= 0 or weight_decay <= 0 or steps <= 0:
        return math.inf
    return 1.0 / (lr * weight_decay * steps)


def warmup_steps(warmup0: int, steps0: int, steps: int, rule: str = "fraction") -> int:
    """The target's warmup: the same fraction of the run ("fraction"), or the same steps ("fixed")."""
    if rule not in WARMUP_RULES:
        raise ValueError(f"unknown warmup rule {rule!r}")
    if warmup0 <= 0:
        return 0
    return warmup0 if rule == "fixed" else max(1, round(warmup0 * steps / steps0))


def eps_ratio(batch0: int, batch: int, rule: str = "sqrt") -> float:
    """Adam's eps at batch B over B0's: sqrt(B0 / B) (the gradient noise's scale), or 1."""
    _positive(batch0=batch0, batch=batch)
    if rule not in EPS_RULES:
        raise ValueError(f"unknown eps rule {rule!r}")
    return math.sqrt(batch0 / batch) if rule == "sqrt" else 1.0


def beta_at_batch(beta: float, batch0: int, batch: int, rule: str = "keep") -> float:
    """An EMA coefficient at batch B: kept, or beta ** (B / B0) (the same half-life in samples)."""
    _positive(batch0=batch0, batch=batch)
    if rule not in BETAS_RULES:
        raise ValueError(f"unknown betas rule {rule!r}")
    return beta if rule == "keep" or beta == 0 else beta ** (batch / batch0)


def steps_for_tokens(tokens_per_param: float, params: int, batch: int, tokens_per_sample: int) -> int:
    """Steps that train `params` parameters on tokens_per_param tokens each (Chinchilla: ~20)."""
    _positive(tokens_per_param=tokens_per_param, params=params, batch=batch, tokens_per_sample=tokens_per_sample)
    return max(1, math.ceil(tokens_per_param * params / (batch * tokens_per_sample)))


@dataclass(frozen=True)
class Run:
    """How long and on what batches a model trains."""
    steps: int
    batch: int
    warmup: int = 0


@dataclass(frozen=True)
class Rules:
    """Which rule each axis follows (recipe `target:`). Exponents None: measured, else the default."""
    horizon_exponent: Optional[float] = None
    batch_exponent: Optional[float] = None
    decay: str = "tau"
    warmup: str = "fraction"
    eps: str = "sqrt"
    betas: str = "keep"
    enabled: bool = True


@dataclass(frozen=True)
class Factors:
    """What the horizon and batch axes do to the proxy's global settings (plain numbers)."""
    proxy: Run
    target: Run
    horizon_exponent: float
    batch_exponent: float
    horizon_lr: float          # x LR from the horizon
    batch_lr: float            # x LR from the batch
    weight_decay: float        # x lambda
    eps: float                 # x eps
    beta1: Optional[float]     # the target's betas (None: unchanged)
    beta2: Optional[float]
    warmup: int                # the target's warmup steps
    exponent_source: str       # where gamma came from: recipe | measured | default

    @property
    def lr(self) -> float:
        return self.horizon_lr * self.batch_lr

    @property
    def identity(self) -> bool:
        return (self.lr == 1.0 and self.weight_decay == 1.0 and self.eps == 1.0 and self.beta1 is None
                and self.beta2 is None and self.warmup == self.proxy.warmup)

    def to_json(self) -> dict:
        d = asdict(self)
        d["lr"] = self.lr
        return d


def factors(optimizer: str, proxy: Run, target: Run, rules: Rules = Rules(),
            measured_horizon: Optional[float] = None, measured_batch: Optional[float] = None,
            betas: tuple[float, float] = (0.9, 0.999)) -> Factors:
    """Every factor from the proxy's run to the target's. Exponents: the recipe's, else the ones
    measured on the proxy, else the documented defaults. rules.enabled False: all 1 (today's transfer)."""
    _positive(proxy_steps=proxy.steps, proxy_batch=proxy.batch, steps=target.steps, batch=target.batch)
    if rules.horizon_exponent is not None:
        gamma, src = rules.horizon_exponent, "recipe"
    elif measured_horizon is not None:
        gamma, src = measured_horizon, "measured"
    else:
        gamma, src = DEFAULT_HORIZON_EXPONENT, "default"
    if rules.batch_exponent is not None:
        beta = rules.batch_exponent
    elif measured_batch is not None:
        beta = measured_batch
    else:
        beta = default_batch_exponent(optimizer, gamma)
    if not rules.enabled:
        return Factors(proxy, target, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, None, None,
                       warmup_steps(proxy.warmup, proxy.steps, target.steps, "fixed"), "off")
    h = horizon_lr_ratio(proxy.steps, target.steps, gamma)
    b = batch_lr_ratio(proxy.batch, target.batch, beta)
    adam = optimizer in ADAM_LIKE
    b1 = b2 = None
    if adam and rules.betas != "keep" and target.batch != proxy.batch:
        b1 = beta_at_batch(betas[0], proxy.batch, target.batch, rules.betas)
        b2 = beta_at_batch(betas[1], proxy.batch, target.batch, rules.betas)
    return Factors(
        proxy, target, gamma, beta, h, b,
        decay_ratio(optimizer, h * b, proxy.steps, target.steps, rules.decay),
        eps_ratio(proxy.batch, target.batch, rules.eps) if adam else 1.0,
        b1, b2, warmup_steps(proxy.warmup, proxy.steps, target.steps, rules.warmup), src)
