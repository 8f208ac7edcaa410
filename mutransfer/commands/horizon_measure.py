"""Measure the horizon (and batch) exponent on the proxy, after `tune`'s search (recipe `target.measure`).

The optimal LR's dependence on the run's length is model-, data- and schedule-dependent, so it is
measured, not assumed: with the tuned values (warmup, decay and eps moved by their rules, the LR not),
a short LR line search (half-octave steps around the
tuned LR, extended while the optimum sits at an edge) at each of 2-4 proxy horizons, several seeds;
report/horizon_fit.py fits eta* ~ T ** -gamma with an interval, leaving out horizons still in early
training. The same for batch sizes at the proxy's steps when `measure.batch_sizes` is given
(eta* ~ B ** beta). Every run is a sweep grid point (commands/sweep.py: the same loop, the same
per-point cache, under the hparams file's folder), so an interrupted measurement resumes.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

from ..engine.hparams import MULTIPLIER_NAMES
from ..report.horizon_fit import ExponentFit, fit_exponent, is_early
from ..report.sweep_fit import mean_or_none, optimum
from ..run.recipe import Recipe
from .sweep import Point, SweepConfig, make_config, run_grid

MAX_EXTEND = 3      # grid extensions (half an octave each) while an optimum sits at the grid's edge


def with_tuned(recipe: Recipe, params: dict[str, Any]) -> Recipe:
    """A copy of the recipe whose train section holds the tuned values (the measurement's centre)."""
    r = recipe.model_copy(deep=True)
    r._path, r._depth = recipe._path, recipe._depth
    t = r.train
    for k, v in params.items():
        if k in MULTIPLIER_NAMES:
            t.multipliers[k] = float(v)
        elif k in ("beta1", "beta2"):
            b = list(t.betas)
            b[0 if k == "beta1" else 1] = float(v)
            t.betas = tuple(b)
        elif hasattr(t, k):
            setattr(t, k, v if isinstance(v, bool) else float(v))
    return r


def default_horizons(steps: int) -> list[int]:
    """The proxy's steps x 1, 2, 4."""
    return [steps, 2 * steps, 4 * steps]


def _grid(center: float, points: int, lo_extra: int = 0, hi_extra: int = 0) -> list[float]:
    """Half-octave steps around `center`, biased low (longer runs want lower LRs): from
    -(points - 2)/2 to +1/2 octave, plus extensions."""
    ks = list(range(-(points - 2) - lo_extra, 2 + hi_extra))
    return [center * 2.0 ** (k / 2) for k in ks]


def _ladder(recipe: Recipe, along: str, ladder: list[int], center: float, points: int, seeds: int,
            cache: Path, workers: int, device: str, progress: bool) -> tuple[dict, float]:
    """Run the line searches; extend the grid while the mean curve's optimum sits at an edge at any rung."""
    lo = hi = 0
    seconds = 0.0
    while True:
        values = _grid(center, points, lo, hi)
        kw: dict[str, Any] = {"horizons": ladder} if along == "horizon" else {"batch_sizes": ladder}
        cfg = make_config(recipe, values=values, parametrization="mup", seeds=seeds, **kw)
        t0 = time.perf_counter()
        res = run_grid(recipe, cfg, cache, workers, device, progress)
        seconds += time.perf_counter() - t0
        xs = [math.log2(v) for v in cfg.values]
        low_edge = high_edge = False
        for h in cfg.widths:
            curve = [mean_or_none([res[Point("mup", h, v, s)]["loss"] for s in range(seeds)]) for v in cfg.values]
            o = optimum(xs, curve)
            if o.at_edge and o.best_index == 0:
                low_edge = True
            elif o.at_edge:
                high_edge = True
        if not (low_edge or high_edge) or lo + hi >= MAX_EXTEND:
            return {"cfg": cfg, "results": res, "xs": xs}, seconds
        lo, hi = lo + int(low_edge), hi + int(high_edge)


def _fit(run: dict, sign: float) -> ExponentFit:
    cfg: SweepConfig = run["cfg"]
    res = run["results"]
    losses, early = {}, {}
    for h in cfg.widths:
        for s in range(cfg.seeds):
            losses[(h, s)] = [res[Point("mup", h, v, s)]["loss"] for v in cfg.values]
        # the rung's best run: is its loss curve past the initial descent?
        recs = [res[Point("mup", h, v, 0)] for v in cfg.values]
        ok = [r for r in recs if r.get("loss") is not None]
        best = min(ok, key=lambda r: r["loss"]) if ok else None
        curve = best.get("curve") if best else None
        early[h] = bool(curve) and is_early(curve) if sign < 0 else False
    return fit_exponent(list(cfg.widths), run["xs"], losses, early, sign=sign)


def measure(recipe: Recipe, params: dict[str, Any], folder: Path, workers: int = 1, device: str = "cpu",
            progress: bool = True, say=print) -> Optional[dict]:
    """The hparams file's `horizon:` section, or None when the recipe asks for no measurement."""
    m = recipe.target.measure if recipe.target is not None else None
    if m is None:
        return None
    r = with_tuned(recipe, params)
    # the rungs train as the target would (warmup, decay, eps by their rules) but with the LR unmoved:
    # the LR's own exponents are what is measured
    r.target.horizon_exponent, r.target.batch_exponent = 0.0, 0.0
    center = float(r.train.lr)
    horizons = sorted(set(m.horizons or default_horizons(r.train.steps)))
    out: dict[str, Any] = {"measured_at": {"steps": r.train.steps, "batch_size": r.train.batch_size,
                                           "width": r.widths.proxy}}
    say(f"measuring the LR's horizon exponent on the proxy: horizons {','.join(map(str, horizons))} steps, "
        f"{m.points}+ LRs around {center:.3g}, {m.seeds} seed(s)")
    run, secs = _ladder(r, "horizon", horizons, center, m.points, m.seeds, folder / "horizon-ladder",
                           workers, device, progress)
    fit = _fit(run, -1.0)
    out["horizon_fit"] = fit.to_json()
    out["seconds"] = round(secs, 1)
    if fit.exponent is not None:
        out["exponent"] = fit.exponent
        say(f"horizon exponent {fit.exponent:.3f} (90% interval {_iv(fit)}), from horizons "
            f"{','.join(map(str, fit.used))}" + (f"; left out as early training or edge optima: "
                                                   f"{','.join(map(str, fit.early))}" if fit.early else ""))
    else:
        say(f"[yellow]horizon exponent not measured[/]: {fit.reason}; scale will use the default")
    if m.batch_sizes:
        bs = sorted(set(m.batch_sizes))
        say(f"measuring the LR's batch exponent at {r.train.steps} steps: batch sizes {','.join(map(str, bs))}")
        brun, bsecs = _ladder(r, "batch", bs, center, m.points, m.seeds, folder / "batch-ladder", workers,
                                 device, progress)
        bfit = _fit(brun, 1.0)
        out["batch_fit"] = bfit.to_json()
        out["seconds"] = round(secs + bsecs, 1)
        if bfit.exponent is not None:
            out["batch_exponent"] = bfit.exponent
            say(f"batch exponent {bfit.exponent:.3f} (90% interval {_iv(bfit)})")
        else:
            say(f"[yellow]batch exponent not measured[/]: {bfit.reason}; scale will use the rule's default")
    return out


def _iv(f: ExponentFit) -> str:
    return "n/a" if f.low is None else f"{f.low:.3f} to {f.high:.3f}"
