"""Reading horizon and batch ladders: the transferred setting's cost, and the exponent of the optimal LR
against the horizon (or the batch size) with an interval. Pure functions of plain lists; no torch.

The x axis is log2 of the LR, as in sweep_fit, so optima are in octaves.

The exponent. At each horizon T (steps) the optimum log2 eta*(T) is the vertex of the parabola through
the best grid point and its neighbours (sweep_fit.optimum) of the seeds' mean curve; the exponent gamma
is minus the least-squares slope of log2 eta* against log2 T (eta* ~ T ** -gamma). Its interval comes
from a bootstrap over seeds: each resample draws, at every horizon, the seeds with replacement, and
refits the optima and the slope. With one seed the interval is the slope's standard error from the
residuals (needs 3 horizons), else unknown.

Early training. Very short runs do not follow the law of longer ones: the optimum of a run still in
its initial descent is set by how fast the loss can fall, not by the noise that the LR must average
(the issue's 400-step optimum sat above both neighbours). A horizon is called early when the best
run's loss still fell by more than EARLY_DROP of its total drop over the last half of the run
(the loss curve has not yet bent into its slow phase), or when its optimum sits at the grid's edge.
Early horizons are left out of the fit and named; with fewer than two horizons left the fit is
refused, and the caller keeps the default exponent.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .sweep_fit import mean_or_none, optimum

EARLY_DROP = 0.25       # share of the whole run's loss drop still made in its second half
BOOTSTRAP = 400


def _finite(y) -> bool:
    return y is not None and math.isfinite(y)


def loss_at(xs: Sequence[float], losses: Sequence[Optional[float]], x: float) -> Optional[float]:
    """The curve at x: the parabola through the three finished grid points around x (a loss curve in
    log LR is locally quadratic, and a chord would overstate the loss between grid points), else linear
    interpolation between two; None outside the finished points."""
    pts = [(a, b) for a, b in zip(xs, losses) if _finite(b)]
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    if len(pts) >= 3:
        # the three consecutive points whose middle one is nearest to x
        j = min(range(1, len(pts) - 1), key=lambda k: abs(pts[k][0] - x))
        (x0, y0), (x1, y1), (x2, y2) = pts[j - 1:j + 2]
        if x0 <= x <= x2:
            return (y0 * (x - x1) * (x - x2) / ((x0 - x1) * (x0 - x2)) + y1 * (x - x0) * (x - x2) / ((x1 - x0) * (x1 - x2))
                    + y2 * (x - x0) * (x - x1) / ((x2 - x0) * (x2 - x1)))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1] if x == pts[0][0] else pts[-1][1]


def best_loss(xs: Sequence[float], losses: Sequence[Optional[float]]) -> Optional[float]:
    """The curve's lowest value: its best grid point, or the parabola's vertex value through it and its
    neighbours when that lies lower (the optimum between grid points)."""
    o = optimum(xs, losses)
    if o.best_index is None:
        return None
    i, y = o.best_index, losses[o.best_index]
    if 0 < i < len(xs) - 1 and _finite(losses[i - 1]) and _finite(losses[i + 1]) and o.log2 is not None:
        (x0, x1, x2), (y0, y1, y2) = xs[i - 1:i + 2], losses[i - 1:i + 2]
        # Lagrange form of the parabola through the three points, evaluated at the vertex
        v = o.log2
        p = (y0 * (v - x1) * (v - x2) / ((x0 - x1) * (x0 - x2)) + y1 * (v - x0) * (v - x2) / ((x1 - x0) * (x1 - x2))
             + y2 * (v - x0) * (v - x1) / ((x2 - x0) * (x2 - x1)))
        return min(y, p)
    return y


def transfer_gap(xs: Sequence[float], reference: Sequence[Optional[float]],
                 curve: Sequence[Optional[float]]) -> Optional[float]:
    """Relative loss excess on `curve` at the reference curve's optimum (the transferred setting) over
    the curve's own best: 0.004 means +0.4%. None when either is unknown."""
    o = optimum(xs, reference)
    if o.log2 is None:
        return None
    y, best = loss_at(xs, curve, o.log2), best_loss(xs, curve)
    if y is None or best is None or best == 0:
        return None
    return y / best - 1


def is_early(curve: Sequence[float], drop: float = EARLY_DROP) -> bool:
    """A training-loss curve (one value per step, or per logging point) still in its initial descent:
    more than `drop` of its total decrease happened in its second half."""
    c = [y for y in curve if _finite(y)]
    if len(c) < 8:
        return True
    k = max(1, len(c) // 20)
    head = sum(c[:k]) / k
    mid = sum(c[len(c) // 2 - k // 2:len(c) // 2 - k // 2 + k]) / k
    tail = sum(c[-k:]) / k
    total = head - tail
    if not total > 0:
        return True
    return (mid - tail) / total > drop


def _slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, Optional[float]]:
    """Least-squares slope and its standard error (None with two points)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n < 3:
        return b, None
    res = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return b, math.sqrt(res / (n - 2) / sxx)


@dataclass
class ExponentFit:
    exponent: Optional[float]             # gamma: eta* ~ T ** -gamma (None: refused)
    low: Optional[float] = None           # 90% interval
    high: Optional[float] = None
    used: list = field(default_factory=list)        # horizons in the fit
    early: list = field(default_factory=list)       # horizons left out as early training / edge optima
    optima: dict = field(default_factory=dict)      # horizon -> log2 eta*
    reason: str = ""                                # why refused, or how the interval was found

    def to_json(self) -> dict:
        return {"exponent": self.exponent, "low": self.low, "high": self.high, "used": self.used,
                "early": self.early, "optima": {str(k): v for k, v in self.optima.items()}, "reason": self.reason}


def fit_exponent(horizons: Sequence[int], xs: Sequence[float],
                 losses: dict, early: Optional[dict] = None, sign: float = -1.0,
                 seed: int = 0, bootstrap: int = BOOTSTRAP) -> ExponentFit:
    """gamma from a ladder. losses[(horizon, seed)] is the loss curve over xs (log2 LR; None where
    diverged); early[horizon] True marks a horizon still in early training (is_early on its best run).
    sign -1: eta* ~ T ** -gamma (horizons); +1: eta* ~ B ** beta (batch sizes)."""
    early = early or {}
    seeds = sorted({s for (_, s) in losses})
    optima: dict = {}
    dropped: list = []
    for h in sorted(set(horizons)):
        curve = [mean_or_none([losses[(h, s)][i] for s in seeds if (h, s) in losses]) for i in range(len(xs))]
        o = optimum(xs, curve)
        if o.log2 is None:
            dropped.append(h)
            continue
        optima[h] = o.log2
        if early.get(h) or o.at_edge:
            dropped.append(h)
    used = [h for h in sorted(optima) if h not in dropped]
    if len(used) < 2:
        return ExponentFit(None, used=used, early=dropped, optima=optima,
                           reason=f"{len(used)} horizon(s) past early training with an optimum inside the grid; "
                                  "need 2")
    lx = [math.log2(h) for h in used]
    b, se = _slope(lx, [optima[h] for h in used])
    gamma = sign * b
    rng = random.Random(seed)
    boots = []
    if len(seeds) > 1:
        for _ in range(bootstrap):
            ys = []
            for h in used:
                pick = [rng.choice(seeds) for _ in seeds]
                curve = [mean_or_none([losses[(h, s)][i] for s in pick if (h, s) in losses]) for i in range(len(xs))]
                o = optimum(xs, curve)
                ys.append(o.log2 if o.log2 is not None else optima[h])
            boots.append(sign * _slope(lx, ys)[0])
        boots.sort()
        lo, hi = boots[int(0.05 * (len(boots) - 1))], boots[int(math.ceil(0.95 * (len(boots) - 1)))]
        # the bootstrap cannot see the grid's own resolution: widen by the slope's standard error
        if se is not None:
            lo, hi = min(lo, gamma - 1.645 * se), max(hi, gamma + 1.645 * se)
        how = f"90% bootstrap over {len(seeds)} seeds" + (" and the fit's residuals" if se is not None else "")
    elif se is not None:
        lo, hi, how = gamma - 1.645 * se, gamma + 1.645 * se, "90% from the fit's residuals (one seed)"
    else:
        lo = hi = None
        how = "one seed and two horizons: no interval"
    return ExponentFit(gamma, min(lo, gamma) if lo is not None else None, max(hi, gamma) if hi is not None else None,
                       used, dropped, optima, how)
