"""The prediction's figure: the ladder's losses (each seed, and their mean) against the fit's variable
on a log axis, the fitted L = E + A·x^-α with its interval band carried out to the target(s), each
target's predicted loss with its interval and, after `scale`, the target's measured loss."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import write_via
from ..outputs_guard import marker
from .predict_fit import curve, fit_ladder

XLABEL = {"params": "parameters", "compute": "training FLOPs", "width": "width"}


def plot_prediction(pred: dict, path: Path, measured: Optional[dict] = None, title: str = "") -> Path:
    """Write the PNG atomically. `measured`: {target width (str): final validation loss}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lad = pred["ladder"]
    xs = [r["x"] for r in lad]
    tx = [t["x"] for t in pred["targets"].values()]
    lo, hi = min(xs) / 1.3, max(xs + tx) * 1.5
    grid = np.geomspace(lo, hi, 80)
    band = fit_ladder(xs, [r["losses"] for r in lad], list(grid), level=pred.get("level", 0.95), boot=800)
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    ax.fill_between(grid, [t["low"] for t in band.targets], [t["high"] for t in band.targets], color="C0",
                    alpha=0.18, lw=0, label=f"{100 * pred.get('level', 0.95):g}% interval")
    ax.plot(grid, curve(pred["fit"], grid), color="C0", lw=1.4,
            label=f"fit: E={pred['fit']['E']:.3f}, α={pred['fit']['alpha']:.2f}")
    for r in lad:
        ax.plot([r["x"]] * len(r["losses"]), r["losses"], "o", ms=3.5, mfc="none", color="0.35")
    ax.plot(xs, [sum(r["losses"]) / len(r["losses"]) for r in lad], "o", color="k", ms=5,
            label="ladder (mean; rings: seeds)")
    for i, r in enumerate(lad):
        ax.annotate(f"w{r['width']}", (r["x"], min(r["losses"])), textcoords="offset points", xytext=(0, -12),
                    ha="center", fontsize=7, color="0.3")
    for k, (w, t) in enumerate(pred["targets"].items()):
        ax.errorbar([t["x"]], [t["loss"]], yerr=[[t["loss"] - t["low"]], [t["high"] - t["loss"]]], fmt="D",
                    color="C1", ms=6, capsize=4, label="prediction" if k == 0 else None)
        ax.annotate(f"w{w}: {t['loss']:.4f}", (t["x"], t["high"]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8, color="C1")
        m = (measured or {}).get(str(w))
        if m is not None and math.isfinite(m):
            inside = t["low"] <= m <= t["high"]
            ax.plot([t["x"]], [m], "*", ms=13, color="C2" if inside else "C3",
                    label=f"measured w{w}: {m:.4f} ({100 * (m - t['loss']) / t['loss']:+.2f}%)")
    ax.set_xscale("log")
    ax.set_xlabel(XLABEL.get(pred.get("fit_on"), pred.get("fit_on", "x")))
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    try:
        return write_via(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110,
                                                       metadata={"Software": marker("prediction plot")}))
    finally:
        plt.close(fig)
