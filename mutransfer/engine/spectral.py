"""The spectral scaling rule (Yang, Simon & Bernstein, "A Spectral Condition for Feature Learning",
Parametrization 1), as pure functions of a weight's fans.

Every weight W is treated as a (fan_out x fan_in) matrix. The rule asks that ||W||_2 and ||dW||_2 be
Theta(sqrt(fan_out / fan_in)); Parametrization 1 achieves it with

    init std   sigma  ~  min(1, sqrt(fan_out / fan_in)) / sqrt(fan_in)
    SGD  LR    eta    ~  fan_out / fan_in
    Adam LR    eta    ~  1 / fan_in           (Adam's update has entries Theta(lr), so ||dW||_2 ~ lr*sqrt(out*in))
    Adam eps          ~  1 / fan_out          (gradient entries are Theta(1/fan_out) for dense inputs)
    weight decay      "independent": the per-step shrink lr * wd is the same at every width (AdamW's
                      decoupled decay, and SGD's L2, whose shrink is also lr * wd); Adam's coupled L2
                      goes through the normalisation instead, so there wd ~ 1 / (fan_out * sigma):
                      the L2 gradient wd * W keeps its size relative to the loss gradient.

One-hot inputs (embedding tables) have fan_in 1; biases and norm gains are fan_in-1 matrices.
No layer is special. Only ratios between two widths are ever used: at the proxy width the model is
the tuned standard model, at any other width each quantity is multiplied by rule(width)/rule(proxy).

This module imports nothing from torch on purpose: check it against the paper in a minute.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

# the optimizers the rules know (a recipe's train.optimizer): the package's one vocabulary for them
Optimizer = Literal["sgd", "adam", "adamw", "muon"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SGD, ADAM, ADAMW, MUON = OPTIMIZERS
ADAM_FAMILY = (ADAM, ADAMW)        # Adam's update (entries Theta(lr)), its eps


# Optimizers named by class (engine/optimizers.py) declare the family of their update; each family
# follows one of the rules in this module:
#   adam        entries of the update are Theta(lr) whatever the gradient's scale (Adam, AdamW, NAdam,
#               RAdam, Adamax, Adagrad, RMSprop): Adam's rule, with decoupled ("independent") decay.
#   sign        the update is sign(.) x lr, entries exactly +-lr (Lion: Chen et al. 2023, "Symbolic
#               Discovery of Optimization Algorithms", Alg. 1; signSGD): the spectral paper's Adam
#               derivation uses only that the entries are Theta(lr) (||dW||_2 ~ lr sqrt(fan_out fan_in)
#               for a dense update), so Adam's rule applies unchanged; Lion has no eps.
#   relative    an Adam-normalised update scaled by the parameter's RMS (Adafactor's "relative step
#               size": Shazeer & Stern 2018, Sec. 7; torch.optim.Adafactor's alpha = max(eps2, RMS(W)) x lr):
#               entries are Theta(lr x init std), so Adam's LR ratio is divided by the init std ratio.
#   sgd         the update is the gradient: SGD's rule.
#   orthogonal  the update's singular values are all ~1 (Muon: Jordan et al. 2024; Bernstein & Newhouse
#               2024, "Old Optimizer, New Norm"): muon_lr_scale for the matrices it orthogonalises.
UPDATE_KINDS = ("adam", "sign", "relative", "sgd", "orthogonal")


def update_family(kind: str) -> str:
    """The rule (SGD, ADAMW or MUON) an update family follows (see UPDATE_KINDS above)."""
    rules = {"adam": ADAMW, "sign": ADAMW, "relative": ADAMW, "sgd": SGD, "orthogonal": MUON}
    if kind not in rules:
        raise ValueError(f"unknown update kind {kind!r}; expected one of {UPDATE_KINDS}")
    return rules[kind]


def _check(fan_in: int, fan_out: int) -> None:
    if fan_in < 1 or fan_out < 1:
        raise ValueError(f"fans must be >= 1, got fan_in={fan_in}, fan_out={fan_out}")


def init_std(fan_in: int, fan_out: int) -> float:
    """sigma = min(1, sqrt(fan_out/fan_in)) / sqrt(fan_in)."""
    _check(fan_in, fan_out)
    return min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)


def lr_scale(fan_in: int, fan_out: int, optimizer: str) -> float:
    """Width-dependence of the learning rate: fan_out/fan_in for SGD, 1/fan_in for Adam(W), and for
    Muon the effective step size of the orthogonalised update, sqrt(fan_out/fan_in) (muon_lr_scale)."""
    _check(fan_in, fan_out)
    if optimizer == SGD:
        return fan_out / fan_in
    if optimizer in (ADAM, ADAMW):
        return 1.0 / fan_in
    if optimizer == MUON:
        return muon_lr_scale(fan_in, fan_out)
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")


def muon_lr_scale(fan_in: int, fan_out: int) -> float:
    """Muon's update O (Newton-Schulz orthogonalised momentum) has all singular values ~1, so
    ||dW||_2 = eta_eff * ||O||_2 = eta_eff: the spectral condition ||dW||_2 ~ sqrt(fan_out/fan_in) asks
    for an effective step eta_eff ~ sqrt(fan_out/fan_in), unclamped. Published scales, for comparison:
    Keller Jordan's sqrt(max(1, out/in)) (torch's adjust_lr_fn="original") clamps the branch where
    out < in (a readout-like or down-projection matrix then gets too large a step as width grows in
    the input dim); Moonshot's 0.2 sqrt(max(out, in)) matches AdamW's update RMS, which grows with width
    (an AdamW-style, not spectral, scale)."""
    _check(fan_in, fan_out)
    return math.sqrt(fan_out / fan_in)


def torch_muon_factor(shape: tuple[int, ...], adjust_lr_fn: str | None = None) -> float:
    """The factor torch.optim.Muon multiplies a group's LR by for a parameter of `shape` (it cannot be
    switched off): "original" sqrt(max(1, A/B)) or "match_rms_adamw" 0.2 sqrt(max(A, B)), (A, B) =
    shape[:2]. The plan divides it out so that the product is the rule's step."""
    a, b = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return 1.0


def eps_scale(fan_in: int, fan_out: int) -> float:
    """Width-dependence of Adam's epsilon: it must shrink like the gradient entries, 1/fan_out."""
    _check(fan_in, fan_out)
    return 1.0 / fan_out


def mup_departure(role: str, fan_in: int, fan_out: int) -> str | None:
    """Where the min(1, .) makes this rule differ from classic muP (Tensor Programs V, Table 3), say how.

    Classic muP assumes the fixed dimension is the small one: input layers have fan_out >= fan_in and
    output layers fan_out <= fan_in. When a fixed dimension is larger than the width (a vocabulary above
    the proxy width, a wide input), the spectral rule takes the other branch of min(1, .)."""
    if role == "output" and fan_out > fan_in:
        return "fan_out > fan_in: init std ~ 1/sqrt(fan_in), not muP's 1/fan_in"
    if role == "input" and fan_in > 1 and fan_out < fan_in:
        return "fan_out < fan_in: init std ~ sqrt(fan_out)/fan_in, not muP's constant"
    return None


def ratios(base: tuple[int, int], new: tuple[int, int], optimizer: str) -> tuple[float, float, float]:
    """(init std, LR, eps) at fans `new` divided by the same at fans `base`; each a (fan_in, fan_out)."""
    return (
        init_std(*new) / init_std(*base),
        lr_scale(*new, optimizer) / lr_scale(*base, optimizer),
        eps_scale(*new) / eps_scale(*base),
    )


def tied_readout_multiplier(fan_in: int) -> float:
    """Forward multiplier of a readout that shares its table with the input embedding: 1/fan_in
    (fan_in = the width d), whatever the vocabulary.

    The table's entries are Theta(1) (embedding rule, fan_in 1). The readout's input h is *not*
    independent of the table: the residual stream carries the current token's own row, so h has a
    component along E[token] of norm ~ sqrt(d), and the logit of that token is m * <E[token], h> ~ m * d.
    The spectral paper's readout rule (init ~ min(1, sqrt(fan_out/fan_in))/sqrt(fan_in), i.e.
    1/sqrt(d) once the vocabulary exceeds d) assumes an input uncorrelated with W, where a logit is a
    sum of d random terms ~ m * sqrt(d). With correlation, only m ~ 1/d keeps every logit, the
    current token's included, Theta(1) at init; and under Adam the table's Theta(lr) entry updates
    then move the logits by m * lr * d = Theta(1) too (muP's readout, Tensor Programs V). The other
    logits start at O(1/sqrt(d)), as an untied muP readout's do."""
    _check(fan_in, 1)
    return 1.0 / fan_in


def l2_scale(fan_in: int, fan_out: int) -> float:
    """Width-dependence of Adam's *coupled* L2 coefficient (torch.optim.Adam's weight_decay).

    Adam normalises g + wd * W entrywise, so the L2 term acts the same at every width only if wd * W
    keeps its size relative to the loss gradient g. Entries of g are Theta(1/fan_out) (as for eps) and
    entries of W are Theta(init_std) (the init dominates the entries; updates are smaller), hence
    wd ~ 1 / (fan_out * init_std). With a fixed wd the L2 term would swamp the gradient of wide
    hidden layers (wd/sqrt(n) against 1/n) and wash out feature learning."""
    return eps_scale(fan_in, fan_out) / init_std(fan_in, fan_out)


def l2_ratio(base: tuple[int, int], new: tuple[int, int]) -> float:
    """Adam's coupled L2 coefficient at fans `new` divided by the same at fans `base`."""
    return l2_scale(*new) / l2_scale(*base)


def independent_weight_decay(weight_decay: float, global_lr: float, group_lr: float) -> float:
    """Decay coefficient for a group whose LR is `group_lr`, such that the per-step decay factor
    group_lr * wd_group equals global_lr * weight_decay at every width ("independent" decay):
    torch's AdamW multiplies parameters by (1 - lr * wd) each step."""
    if group_lr == 0.0:
        return 0.0
    if group_lr == global_lr:   # exact at the proxy: one global decay, as in a plain model
        return weight_decay
    return weight_decay * global_lr / group_lr
