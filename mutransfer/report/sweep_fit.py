"""Pure rules for reading a sweep: where is each width's optimum, how far does it drift, is wider better.

Everything here works on plain lists of floats (None for a diverged point); no torch, no files.
The x axis is log2 of the swept value (the learning rate by default), so distances are in octaves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Optimum:
    log2: Optional[float]      # fitted optimum in log2(value); None when no point finished
    best_index: Optional[int]  # index of the best grid point
    at_edge: bool              # the best grid point is the first or last: the true optimum may lie outside


def _finite(y: Optional[float]) -> bool:
    return y is not None and math.isfinite(y)


def parabola_vertex(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Vertex of the parabola through three points (x need not be evenly spaced); None if it opens
    downwards or is flat (no minimum)."""
    (x0, x1, x2), (y0, y1, y2) = x, y
    d = (x0 - x1) * (x0 - x2) * (x1 - x2)
    if d == 0:
        return None
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / d
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / d
    if not a > 0:
        return None
    return -b / (2 * a)


def optimum(xs: Sequence[float], losses: Sequence[Optional[float]]) -> Optimum:
    """The optimum of one loss curve: the best finite grid point, refined by the parabola through it
    and its two neighbours (the vertex is kept within those neighbours). At the edge of the grid, or
    when a neighbour diverged, the best grid point itself."""
    idx = [i for i, y in enumerate(losses) if _finite(y)]
    if not idx:
        return Optimum(None, None, False)
    i = min(idx, key=lambda k: losses[k])
    edge = i == 0 or i == len(xs) - 1
    if edge or not (_finite(losses[i - 1]) and _finite(losses[i + 1])):
        return Optimum(float(xs[i]), i, edge)
    v = parabola_vertex(xs[i - 1:i + 2], losses[i - 1:i + 2])
    if v is None:
        return Optimum(float(xs[i]), i, False)
    return Optimum(min(max(v, xs[i - 1]), xs[i + 1]), i, False)


def drift(optima: Sequence[Optional[float]]) -> Optional[float]:
    """max - min of the optima (octaves when they are log2 values); None with fewer than two."""
    vals = [o for o in optima if o is not None]
    if len(vals) < 2:
        return None
    return max(vals) - min(vals)


def shared_index(curves: Sequence[Sequence[Optional[float]]]) -> Optional[int]:
    """The grid index that every width finished and whose mean loss over widths is lowest: the
    shared optimum at which widths are compared. None when no index finished at every width."""
    n = min(len(c) for c in curves) if curves else 0
    ok = [j for j in range(n) if all(_finite(c[j]) for c in curves)]
    if not ok:
        return None
    return min(ok, key=lambda j: sum(c[j] for c in curves) / len(curves))


def wider_is_better(losses_by_width: Sequence[tuple[int, float]], tol: float = 0.0) -> tuple[bool, list[tuple[int, int]]]:
    """Is the loss non-increasing in width (up to `tol`, relative)? Returns (ok, violations) where
    each violation is a pair (narrower width, wider width) in which the wider one is worse."""
    pts = sorted(losses_by_width)
    bad = [(w0, w1) for (w0, y0), (w1, y1) in zip(pts, pts[1:]) if y1 > y0 * (1 + tol)]
    return not bad, bad


def mean_or_none(vals: Sequence[Optional[float]]) -> Optional[float]:
    """The mean over seeds, or None if any seed diverged (a diverged seed marks the point diverged)."""
    if not vals or not all(_finite(v) for v in vals):
        return None
    return sum(vals) / len(vals)


# ------------------------------------------------------------------------------------- transfer verdict
# Does the proxy's optimum transfer? (docs/verdicts.md.) Per width, the optimum of the seed-mean curve
# with a 90% interval from a bootstrap over seeds (resampled with replacement, fixed RNG) widened by the
# grid's resolution where no parabola refined it (half a grid step each side; open towards outside at
# the grid's edge); the drift of the optimum from the proxy (narrowest) to the widest width, and the
# regret at the widest width, (its loss at the proxy's best grid value - its own best) / its own best,
# each with the bootstrap's interval. Then
#   fails         the regret is surely above REGRET_TOL, or the drift surely beyond ±DRIFT_TOL while
#                 the regret is not surely small (or the proxy's optimum diverges at the widest width);
#   holds         the regret is surely within REGRET_TOL and the drift not surely beyond ±DRIFT_TOL,
#                 with 2 seeds or more and no optimum at the grid's edge;
#   inconclusive  anything else (too few seeds, an optimum at the edge, intervals across a tolerance).

REGRET_TOL = 0.02          # 2% of the widest width's best loss
DRIFT_TOL = 1.0            # octaves of the swept value
LEVEL = 0.90               # two-sided interval
BOOTSTRAP = 400
TRANSFER_EXIT = {"holds": 0, "fails": 1, "inconclusive": 3}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    i = int(math.floor(pos))
    j = min(i + 1, len(xs) - 1)
    a, b = xs[i], xs[j]
    if a == b or math.isinf(a) or math.isinf(b):
        return a if pos == i or math.isinf(a) and a < 0 else b
    return a + (b - a) * (pos - i)


def _resample(rng, seed_curves: list[list[Optional[float]]]) -> list[Optional[float]]:
    pick = [seed_curves[rng.randrange(len(seed_curves))] for _ in seed_curves]
    return [mean_or_none([c[j] for c in pick]) for j in range(len(seed_curves[0]))]


def _mean_curve(seed_curves: list[list[Optional[float]]]) -> list[Optional[float]]:
    return [mean_or_none([c[j] for c in seed_curves]) for j in range(len(seed_curves[0]))]


def _resolution(xs: Sequence[float], o: Optimum, refined: bool) -> tuple[float, float]:
    """(down, up): the grid's own uncertainty on an optimum not refined by a parabola."""
    if o.best_index is None or refined:
        return 0.0, 0.0
    i = o.best_index
    down = math.inf if i == 0 else (xs[i] - xs[i - 1]) / 2
    up = math.inf if i == len(xs) - 1 else (xs[i + 1] - xs[i]) / 2
    return down, up


def _refined(xs: Sequence[float], curve: Sequence[Optional[float]], o: Optimum) -> bool:
    i = o.best_index
    return (i is not None and 0 < i < len(xs) - 1 and _finite(curve[i - 1]) and _finite(curve[i + 1])
            and o.log2 != xs[i])


def _regret(curve_p: list[Optional[float]], curve_w: list[Optional[float]]) -> Optional[float]:
    """Relative regret at the wide width of the proxy's best grid point (inf when it diverges there)."""
    jp = optimum(list(range(len(curve_p))), curve_p).best_index
    best = [y for y in curve_w if _finite(y)]
    if jp is None or not best:
        return None
    if not _finite(curve_w[jp]):
        return math.inf
    b = min(best)
    return (curve_w[jp] - b) / abs(b) if b else math.inf


def transfer(xs: Sequence[float], seed_curves: dict[int, list[list[Optional[float]]]],
             regret_tol: float = REGRET_TOL, drift_tol: float = DRIFT_TOL, level: float = LEVEL,
             resamples: int = BOOTSTRAP, proxy: Optional[int] = None) -> dict:
    """The transfer verdict of one arm. seed_curves: width -> per seed, the losses over xs (None
    where diverged); proxy: the axis value tuned on (default the smallest), transferred to the largest
    (the smallest if the proxy is the largest). Returns plain JSON data (see the block comment above)."""
    import random

    widths = sorted(seed_curves)
    seeds = min(len(c) for c in seed_curves.values()) if seed_curves else 0
    rng = random.Random(0)
    qlo, qhi = (1 - level) / 2, 1 - (1 - level) / 2
    per_width, boots = {}, {}
    for w in widths:
        curve = _mean_curve(seed_curves[w])
        o = optimum(xs, curve)
        down, up = _resolution(xs, o, _refined(xs, curve, o))
        samples = [_resample(rng, seed_curves[w]) for _ in range(resamples if seeds > 1 else 1)]
        opts = [optimum(xs, c).log2 for c in samples]
        fin = [v for v in opts if v is not None]
        boots[w] = samples
        lo = _quantile(fin, qlo) - down if fin else -math.inf
        hi = _quantile(fin, qhi) + up if fin else math.inf
        per_width[str(w)] = {"optimum": o.log2, "interval": [lo, hi], "at_edge": o.at_edge,
                             "best_loss": min((y for y in curve if _finite(y)), default=None)}
    out = {"widths": widths, "seeds": seeds, "level": level, "regret_tol": regret_tol, "drift_tol": drift_tol,
           "optima": per_width}
    if len(widths) < 2:
        return _json_safe({**out, "verdict": "inconclusive", "why": "needs at least 2 widths", "drift": None,
                           "regret": None})
    p = proxy if proxy in seed_curves else widths[0]
    w = widths[-1] if widths[-1] != p else widths[0]
    op, ow = per_width[str(p)], per_width[str(w)]
    drift_pt = None if op["optimum"] is None or ow["optimum"] is None else ow["optimum"] - op["optimum"]
    d_lo = ow["interval"][0] - op["interval"][1]
    d_hi = ow["interval"][1] - op["interval"][0]
    regret_pt = _regret(_mean_curve(seed_curves[p]), _mean_curve(seed_curves[w]))
    rs = [_regret(a, b) for a, b in zip(boots[p], boots[w])]
    rs = [r for r in rs if r is not None]
    r_lo, r_hi = (_quantile(rs, qlo), _quantile(rs, qhi)) if rs and seeds > 1 else (-math.inf, math.inf)
    out["drift"] = {"octaves": drift_pt, "interval": [d_lo, d_hi], "from": p, "to": w}
    out["regret"] = {"value": regret_pt, "interval": [r_lo, r_hi], "at": w}
    verdict, why = _transfer_verdict(drift_pt, (d_lo, d_hi), regret_pt, (r_lo, r_hi), seeds,
                                     op["at_edge"] or ow["at_edge"], regret_tol, drift_tol)
    return _json_safe({**out, "verdict": verdict, "why": why})


def _json_safe(d):
    """Strict JSON: an unbounded side of an interval (or an infinite regret) as null."""
    if isinstance(d, dict):
        return {k: _json_safe(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_json_safe(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


def _transfer_verdict(drift_pt, drift_iv, regret_pt, regret_iv, seeds, edge, regret_tol, drift_tol):
    if regret_pt is None or drift_pt is None:
        return "inconclusive", "no optimum at the proxy or the widest width (every point diverged)"
    r_lo, r_hi = regret_iv
    if regret_pt == math.inf:
        return "fails", "the proxy's optimum diverges at the widest width"
    regret_large = seeds > 1 and r_lo > regret_tol
    regret_small = seeds > 1 and r_hi <= regret_tol
    drift_large = drift_iv[0] > drift_tol or drift_iv[1] < -drift_tol
    drift_small = -drift_tol <= drift_iv[0] and drift_iv[1] <= drift_tol
    if regret_large:
        return "fails", f"regret above {regret_tol:.0%} beyond the uncertainty"
    if drift_large and not regret_small and seeds > 1:
        return "fails", f"the optimum drifts beyond ±{drift_tol:g} octaves beyond the uncertainty"
    if seeds < 2:
        return "inconclusive", "one seed gives no uncertainty: rerun with --seeds 3"
    if edge:
        return "inconclusive", "an optimum at the grid's edge: widen the grid"
    if regret_small and not drift_large:
        return "holds", f"regret within {regret_tol:.0%} and drift within ±{drift_tol:g} octaves" + (
            "" if drift_small else " not excluded")
    need = min(16, max(seeds * 2, 3))
    return "inconclusive", f"the intervals straddle a tolerance: rerun with --seeds {need}"


def transfer_line(t: dict, name: str, param: str = "lr", axis: str = "width") -> str:
    """One line: the verdict with its numbers (null interval ends are unbounded)."""
    def iv(x, fmt):
        return "[" + ", ".join(("-∞" if i == 0 else "∞") if v is None else format(v, fmt) for i, v in enumerate(x)) + "]"
    head = f"{name}: transfer {t['verdict']}"
    if t.get("drift") is None or t.get("regret") is None or t["drift"]["octaves"] is None:
        return f"{head} ({t['why']})"
    d, r = t["drift"], t["regret"]
    pct = int(round(t["level"] * 100))
    rv = "∞ (diverges)" if r["value"] is None else f"{r['value']:.1%}"
    dv = "n/a" if d["octaves"] is None else f"{d['octaves']:+.2f}"
    riv = [None if v is None else 100 * v for v in r["interval"]]
    return (f"{head}: optimum {param} drift {dv} octaves {iv(d['interval'], '+.2f')} from {axis} {d['from']} to "
            f"{d['to']}; regret at {axis} {r['at']} {rv}" + ("" if r["value"] is None else f" {iv(riv, '.1f')}%") +
            " "
            f"({pct}% intervals, {t['seeds']} seed{'s' * (t['seeds'] != 1)}; {t['why']})")
