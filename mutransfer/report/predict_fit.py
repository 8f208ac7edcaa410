"""The loss of a wide target predicted from a ladder of narrower models: a saturating power law

    L(x) = E + A · x^(−α)          x: parameters, compute (FLOPs) or width

fitted to the ladder's final validation losses, with a bootstrap interval. Pure numpy; no torch.

Why it works: under μP the tuned hyperparameters stay optimal as width grows, so loss is a smooth,
saturating function of model size at fixed data and steps (Kaplan et al. 2020, "Scaling laws for
neural language models", eq. 1.4 form L = (N_c/N)^α_N; Hoffmann et al. 2022, "Training compute-optimal
large language models", eq. 2 adds the irreducible term E). TP5 (Yang et al. 2022) §6 and Fig. 1 show
the μP curves nesting wider-is-better at the shared optimum, which is what makes the extrapolation fair.

The fit: for a given α the model is linear in (E, A), so E and A come from least squares with
E >= 0, A >= 0 (variable projection), and α from a 1-D search over the profile (a log-spaced grid,
then a bounded refinement). The interval:
- seeds >= 2 at every width: bootstrap over seeds (each width's seeds resampled with replacement,
  deviations from the width's mean inflated by sqrt(n/(n-1)) so that 2 seeds do not understate the
  spread), each replicate refitted;
- one seed and >= 4 widths: bootstrap over the fit's residuals (inflated by sqrt(m/(m-3)));
- one seed and 3 widths: the fit is exact and says nothing about its error: refused.
Replicates' predictions are the fit's uncertainty; the target is ONE seed, so its own seed noise
(the ladder's pooled within-width standard deviation, or the residuals') is added to each replicate
before taking the percentiles. Model error beyond that (a curve that bends after the ladder) is not
in the interval: `check` says what a miss suggests.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError

FIT_ON = ("params", "compute", "width")
ALPHA_RANGE = (1e-3, 4.0)
_GRID = np.geomspace(*ALPHA_RANGE, 481)


@dataclass
class Fit:
    E: float
    A: float          # in units of x itself: L = E + A * x**-alpha
    alpha: float
    sse: float


@dataclass
class Prediction:
    """The fit, its parameters' intervals and the predicted loss (with interval) at each target x."""
    fit: Fit
    method: str                               # "seeds" | "residuals"
    level: float
    intervals: dict = field(default_factory=dict)     # {"E": [lo, hi], "A": ..., "alpha": ...}
    noise: float = 0.0                        # the one-seed noise added to the target's interval
    targets: list = field(default_factory=list)       # [{"x", "loss", "low", "high"}]

    def to_dict(self) -> dict:
        return asdict(self)


def _solve(x: np.ndarray, y: np.ndarray, alphas: np.ndarray):
    """For every alpha (G,) and replicate (B, m) of losses y at xs x (m,): the constrained least-squares
    (E, A) and its sum of squared errors. Returns E, A, sse of shape (B, G). x is pre-scaled to ~1."""
    z = x[None, :] ** -alphas[:, None]                      # (G, m)
    zm = z.mean(1)                                          # (G,)
    zc = z - zm[:, None]
    szz = (zc ** 2).sum(1)                                  # (G,)
    ym = y.mean(1)                                          # (B,)
    yc = y - ym[:, None]
    A = (yc @ zc.T) / np.maximum(szz, 1e-300)               # (B, G)
    E = ym[:, None] - A * zm[None, :]
    # the constraints: A < 0 -> a flat line (A = 0, E = mean); E < 0 -> through the origin (E = 0)
    flat = A < 0
    A = np.where(flat, 0.0, A)
    E = np.where(flat, ym[:, None], E)
    neg = E < 0
    if neg.any():
        A0 = np.maximum((y @ z.T) / (z ** 2).sum(1)[None, :], 0.0)
        A = np.where(neg, A0, A)
        E = np.where(neg, 0.0, E)
    pred = E[:, :, None] + A[:, :, None] * z[None, :, :]    # (B, G, m)
    sse = ((pred - y[:, None, :]) ** 2).sum(2)
    return E, A, sse


def _fit_many(x: np.ndarray, ys: np.ndarray, refine: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fits of many replicates (B, m) at once: E, A (in scaled x units), alpha, sse (each (B,))."""
    E, A, sse = _solve(x, ys, _GRID)
    k = sse.argmin(1)
    rows = np.arange(ys.shape[0])
    e, a, al, s = E[rows, k], A[rows, k], _GRID[k], sse[rows, k]
    if not refine:
        return e, a, al, s
    from scipy.optimize import minimize_scalar

    for i in range(ys.shape[0]):
        lo, hi = _GRID[max(k[i] - 1, 0)], _GRID[min(k[i] + 1, len(_GRID) - 1)]
        if lo == hi:
            continue

        def f(la, i=i):
            return float(_solve(x, ys[i:i + 1], np.array([math.exp(la)]))[2][0, 0])

        r = minimize_scalar(f, bounds=(math.log(lo), math.log(hi)), method="bounded",
                            options={"xatol": 1e-7})
        if r.fun <= s[i]:
            ee, aa, ss = _solve(x, ys[i:i + 1], np.array([math.exp(r.x)]))
            e[i], a[i], al[i], s[i] = ee[0, 0], aa[0, 0], math.exp(r.x), ss[0, 0]
    return e, a, al, s


def check_ladder(xs: Sequence[float], losses: Sequence[Sequence[float]], where: str = "--widths") -> None:
    """UserError unless the ladder can be fitted with an interval: >= 3 distinct sizes, and with one
    seed >= 4 of them; every loss finite."""
    n = len(set(float(x) for x in xs))
    if n < 3:
        raise UserError(where, f"a ladder of {n} width(s) is too short to fit E + A·x^-α (3 parameters); "
                        "give at least 3 widths")
    seeds = min(len(v) for v in losses)
    if seeds < 2 and n < 4:
        raise UserError(where, "3 widths with 1 seed fit the curve exactly and leave nothing to estimate its "
                        "error from; use --seeds 2 or 4+ widths")
    for x, v in zip(xs, losses):
        if not all(math.isfinite(float(y)) for y in v):
            raise UserError(where, f"the loss at x={x:g} is not finite ({list(v)}); the ladder diverged there")


def fit_ladder(xs: Sequence[float], losses: Sequence[Sequence[float]], targets: Sequence[float] = (),
               level: float = 0.95, boot: int = 2000, seed: int = 0) -> Prediction:
    """Fit L = E + A·x^-α to `losses` (one list of per-seed losses per x) and predict at `targets`.

    Intervals are bootstrap percentiles at `level` (see the module docstring for the method)."""
    if not 0 < level < 1:
        raise UserError("--level", f"must be between 0 and 1, got {level}")
    check_ladder(xs, losses)
    order = np.argsort(np.asarray(xs, float))
    x = np.asarray(xs, float)[order]
    vals = [np.asarray(losses[i], float) for i in order]
    scale = x[0]
    xs_ = x / scale
    means = np.array([v.mean() for v in vals])
    e, a, al, s = _fit_many(xs_, means[None, :], refine=True)
    fit = Fit(float(e[0]), float(a[0] * scale ** al[0]), float(al[0]), float(s[0]))

    rng = np.random.default_rng(seed)
    n_seeds = min(len(v) for v in vals)
    if n_seeds >= 2:
        method = "seeds"
        reps = np.empty((boot, len(x)))
        ss, dof = 0.0, 0
        for j, v in enumerate(vals):
            n = len(v)
            dev = (v - v.mean()) * math.sqrt(n / (n - 1))
            pick = rng.integers(0, n, size=(boot, n))
            reps[:, j] = v.mean() + dev[pick].mean(1)
            ss += float(((v - v.mean()) ** 2).sum())
            dof += n - 1
        noise = math.sqrt(ss / dof)
    else:
        method = "residuals"
        fitted = fit.E + fit.A * x ** -fit.alpha
        res = means - fitted
        m = len(x)
        res = res * math.sqrt(m / (m - 3))
        reps = fitted[None, :] + res[rng.integers(0, m, size=(boot, m))]
        noise = math.sqrt(float((res ** 2).sum()) / m)
    be, ba, bal, _ = _fit_many(xs_, reps, refine=False)
    bA = ba * scale ** bal
    q = ((1 - level) / 2, 1 - (1 - level) / 2)

    def iv(v) -> list:
        return [float(t) for t in np.quantile(v, q)]

    pred = Prediction(fit, method, level, {"E": iv(be), "A": iv(bA), "alpha": iv(bal)}, noise)
    eps = rng.normal(0.0, noise, size=boot)      # one draw per replicate for every target: a smooth band
    for t in targets:
        mu = fit.E + fit.A * float(t) ** -fit.alpha
        draws = be + bA * float(t) ** -bal + eps
        lo, hi = iv(draws)
        pred.targets.append({"x": float(t), "loss": float(mu), "low": min(lo, mu), "high": max(hi, mu)})
    return pred


def curve(fit: dict | Fit, x: Sequence[float]) -> np.ndarray:
    f = fit if isinstance(fit, dict) else asdict(fit)
    return f["E"] + f["A"] * np.asarray(x, float) ** -f["alpha"]


def check(measured: Optional[float], prediction: Optional[dict], *, width: int, steps: int,
          hparams: dict, base_width: int, depth: Optional[int] = None, batch_size: Optional[int] = None) -> dict:
    """The target's final validation loss against the prediction the hparams file holds for this
    width: {"status": "ok" | "missed" | "skipped", "message", ...}. Skipped (with why) when there is
    no prediction, or it was made for other steps, batch size, hparams, proxy width or depth."""
    if not prediction:
        return {"status": "skipped", "message": "no prediction in the hparams file (run `mutransfer predict`)"}
    t = (prediction.get("targets") or {}).get(str(width)) or (prediction.get("targets") or {}).get(width)
    if t is None:
        have = ", ".join(str(k) for k in (prediction.get("targets") or {}))
        return {"status": "skipped", "message": f"the prediction is for width(s) {have or 'none'}, not {width}"}
    why = []
    if t.get("steps") != steps:
        why.append(f"{t.get('steps')} steps (this run: {steps})")
    if batch_size is not None and t.get("batch_size") != batch_size:
        why.append(f"batch size {t.get('batch_size')} (this run: {batch_size})")
    if _norm(prediction.get("hparams")) != _norm(hparams):
        why.append("other hyperparameter values")
    if prediction.get("proxy_width") != base_width:
        why.append(f"proxy width {prediction.get('proxy_width')} (this run: {base_width})")
    if prediction.get("depth") != depth:
        why.append(f"depth {prediction.get('depth')} (this run: {depth})")
    base = {"predicted": t["loss"], "low": t["low"], "high": t["high"], "level": prediction.get("level")}
    if why:
        return {"status": "skipped", **base,
                "message": "the prediction was made for " + " and ".join(why) + "; not compared"}
    if measured is None or not math.isfinite(measured):
        return {"status": "skipped", **base, "message": "no final validation loss to compare with the prediction"}
    err = 100 * (measured - t["loss"]) / t["loss"]
    lvl = f"{100 * prediction.get('level', 0.95):g}%"
    out = {**base, "measured": measured, "error_pct": err, "inside": t["low"] <= measured <= t["high"]}
    span = f"[{t['low']:.4f}, {t['high']:.4f}]"
    if out["inside"]:
        return {"status": "ok", **out, "message": f"as predicted: validation loss {measured:.4f}, predicted "
                f"{t['loss']:.4f} {span} ({lvl} interval; {err:+.2f}%)"}
    if measured > t["high"]:
        hint = ("the target trained worse than the ladder says: a layer may not be transferring at this width "
                "(run `mutransfer coord-check` with widths up to this one), or this run differs from the ladder "
                "in something no rule was measured for (steps/horizon, batch size, data)")
    else:
        hint = ("the target did better than the ladder says: the curve bends beyond the ladder (fit a wider "
                "ladder), or the ladder's widths were not at their optimum (hparams tuned for the proxy only)")
    return {"status": "missed", **out, "message": f"PREDICTION MISSED: validation loss {measured:.4f} is "
            f"{'above' if measured > t['high'] else 'below'} the {lvl} interval {span} around {t['loss']:.4f} "
            f"({err:+.2f}%): {hint}"}


def _norm(h) -> dict:
    return {k: (v if isinstance(v, bool) else round(float(v), 12)) for k, v in (h or {}).items()}
