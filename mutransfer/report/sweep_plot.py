"""The sweep's figure (TP5 Fig. 1 style): one panel per parametrization, loss against log2 of the swept
value, one curve per width coloured by width, each width's fitted optimum marked with its interval shaded,
diverged points as x, and each panel's transfer verdict (report/sweep_fit.transfer) in its title."""
from __future__ import annotations

import math
from pathlib import Path

from ..atomic import write_via
from ..outputs_guard import marker

LABEL = {"mup": "μP", "sp": "SP"}


def plot_sweep(summary: dict, path: Path, title: str = "") -> Path:
    """Write the PNG atomically (temporary file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    param = summary.get("param", "lr")
    key = "lrs" if param == "lr" else "values"
    best_key = "best_log2_lr" if param == "lr" else "best_log2_value"
    pars = list(summary["results"])
    widths = sorted({int(w) for per in summary["results"].values() for w in per})
    cmap = plt.get_cmap("viridis")
    color = {w: cmap(i / max(1, len(widths) - 1) * 0.9) for i, w in enumerate(widths)}

    finite = [y for per in summary["results"].values() for d in per.values() for y in d["losses"] if y is not None]
    lo = min(finite) if finite else 0.0
    best_each = [min(y for y in d["losses"] if y is not None) for per in summary["results"].values()
                 for d in per.values() if any(y is not None for y in d["losses"])]
    # y range: from the best loss to a little above the worst width's best, so the minima are legible
    hi = max(best_each) if best_each else 1.0
    span = max(hi - lo, 0.02 * max(abs(lo), 1e-3))
    ylo, yhi = lo - 0.15 * span, hi + 2.5 * span

    fig, axes = plt.subplots(1, len(pars), figsize=(max(6.8, 5.2 * len(pars)), 4.2), sharey=True, squeeze=False)
    for ax, par in zip(axes[0], pars):
        for w in widths:
            d = summary["results"][par].get(str(w))
            if d is None:
                continue
            xs = [math.log2(v) for v in d[key]]
            ys = [y if y is not None else math.nan for y in d["losses"]]
            inside = [y if y <= yhi else math.nan for y in ys]      # points above the limit are not plateaus
            ax.plot(xs, inside, "-o", ms=3, color=color[w], label=f"{summary.get('axis', 'width')} {w}")
            above = [x for x, y in zip(xs, ys) if y == y and y > yhi]
            if above:       # off the scale: an open triangle at the top edge, not a point on a fake plateau
                ax.plot(above, [yhi] * len(above), "^", mfc="none", color=color[w], ms=7, clip_on=False)
            dx = [x for x, y in zip(xs, d["losses"]) if y is None]
            if dx:
                ax.plot(dx, [yhi - 0.03 * (yhi - ylo)] * len(dx), "x", color=color[w], ms=6)
            b = d.get(best_key)
            if b is not None:
                ax.axvline(b, color=color[w], lw=0.8, ls=":")
            iv = summary.get("transfer", {}).get(par, {}).get("optima", {}).get(str(w), {}).get("interval")
            if iv and b is not None:      # the optimum's interval (report/sweep_fit.transfer), clipped to the grid
                lo = min(xs) if iv[0] is None else max(iv[0], min(xs))
                hi = max(xs) if iv[1] is None else min(iv[1], max(xs))
                if hi > lo:
                    ax.axvspan(lo, hi, color=color[w], alpha=0.10, lw=0)
        dr = summary.get("drift_octaves", {}).get(par)
        axis = summary.get("axis", "width")
        name = ({"mup": f"{axis} rule", "sp": f"no {axis} rule"}.get(par, par) if axis != "width"
                else LABEL.get(par, par))
        t = summary.get("transfer", {}).get(par)
        verdict = "" if t is None else f"\ntransfer {t['verdict']}" + (
            "" if not t.get("regret") or t["regret"]["value"] is None else f" (regret {t['regret']['value']:.1%} at {t['regret']['at']})")
        ax.set_title(name + ("" if dr is None else f" — optimum drift {dr:.2f} octaves") + verdict,
                     fontsize=10, color={"fails": "red", "inconclusive": "darkorange"}.get(t and t["verdict"], "black"))
        ax.set_xlabel(f"log2 {param}")
        ax.set_ylim(ylo, yhi)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (mean of last steps)")
    axes[0][-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title + "   (dotted: fitted optimum, shaded: its 90% interval; x: diverged; △: above the plotted range)",
                     fontsize=10)
    fig.tight_layout()
    try:
        return write_via(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata={"Software": marker("sweep plot")}))
    finally:
        plt.close(fig)
