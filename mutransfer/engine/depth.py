"""The depth rule, as pure functions of (base depth, depth, alpha): tune a shallow proxy, train a deep
target. No torch here.

Every residual branch's contribution is multiplied by

    m = (L_base / L) ** alpha          alpha = 1: CompleteP (Dey et al. 2025), alpha = 1/2: depth-muP
                                       (Tensor Programs VI, Yang et al. 2023)

so that the sum of L branch outputs keeps its size as L grows. Per-parameter settings of everything
inside a residual block then follow from what m does to the block's gradients and updates (the abc
symmetry of Tensor Programs V, 000_c00520bc38e18664.txt): the gradient of a parameter inside a
branch is scaled by m, and the branch's change per step must be Theta(1/L) (CompleteP's "complete
feature learning": each block moves as much as the others, and together Theta(1)).

    Adam / AdamW   the update has entries Theta(lr) whatever the gradient's scale, so the branch moves
                   by m * lr: lr x (L / L_base) ** (alpha - 1)        (1 for CompleteP)
                   eps follows the gradient:  eps x m
    SGD            the update is lr * gradient ~ lr * m and moves the branch by m^2 * lr:
                   lr x (L / L_base) ** (2 alpha - 1)                   (L / L_base for CompleteP)
    weight decay   AdamW and SGD: "independent" (the per-step shrink lr * wd unchanged), so the
                   coefficient follows 1 / lr ratio; Adam's coupled L2 follows the gradient, x m
    init           unchanged: the multiplier, not the init, scales the branch

These are the rules of CompleteP's Table 1 (the EleutherAI nanoGPT-mup `completep` branch writes the
same as `depth_alpha_exp`-dependent LR and eps factors) for Adam, and their SGD counterpart by the same
argument. At the proxy depth every factor is 1: the model is the plain one.
"""
from __future__ import annotations

ALPHAS = (0.5, 1.0)


def _check(base_depth: int, depth: int, alpha: float) -> None:
    if base_depth < 1 or depth < 1:
        raise ValueError(f"depths must be >= 1, got base {base_depth}, depth {depth}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def branch_multiplier(base_depth: int, depth: int, alpha: float = 1.0) -> float:
    """m = (L_base / L) ** alpha, the factor on every residual branch's output."""
    _check(base_depth, depth, alpha)
    return (base_depth / depth) ** alpha


def lr_ratio(base_depth: int, depth: int, alpha: float, optimizer: str) -> float:
    """LR of a parameter inside a residual block at depth L over its LR at the base depth."""
    _check(base_depth, depth, alpha)
    r = depth / base_depth
    if optimizer == "sgd":
        return r ** (2 * alpha - 1)
    if optimizer in ("adam", "adamw", "muon"):     # an update of fixed size, as Adam's
        return r ** (alpha - 1)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def eps_ratio(base_depth: int, depth: int, alpha: float) -> float:
    """Adam's eps inside a block: it follows the gradient, which the multiplier scales by m."""
    return branch_multiplier(base_depth, depth, alpha)


def l2_ratio(base_depth: int, depth: int, alpha: float) -> float:
    """Adam's coupled L2 coefficient inside a block: wd * W must keep its size against the gradient."""
    return branch_multiplier(base_depth, depth, alpha)
