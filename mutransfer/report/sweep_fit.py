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
