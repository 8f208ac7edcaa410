"""`tune --plot`: one PNG with the optimisation history and the parameter importances (matplotlib, Agg).

Importances come from Optuna's fANOVA evaluator when scikit-learn is installed, else from its PED-ANOVA
evaluator (no extra dependency); a single searched parameter has importance 1 by definition.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..atomic import write_via
from ..outputs_guard import marker


def importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """{param: importance} over complete trials, and the evaluator's name ('' when none could run)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = sorted({k for t in trials for k in t.params})
    if len(names) == 1:
        return {names[0]: 1.0}, "single parameter"
    if len(trials) < 2 or not names:
        return {}, ""
    try:
        import sklearn  # noqa: F401

        evaluator, label = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    except ImportError:
        evaluator, label = optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), label
    except Exception:  # noqa: BLE001 - too few or too uniform trials for the evaluator
        return {}, ""


def _ylim(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo or abs(hi) or 1.0)
    return lo - pad, hi + pad


def plot_study(study: optuna.Study, path: str | Path) -> Path:
    """History (diverged trials' penalties drawn at the top edge, off the scale of the others), the
    loss against the LR (the slice a muTransfer user reads the optimum from), and importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    good = [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("diverged")]
    div = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("diverged")]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    pvals = {t.number: t.intermediate_values[max(t.intermediate_values)] for t in pruned}
    shown = [t.value for t in good] + list(pvals.values())
    lo, hi = _ylim(shown) if shown else (0.0, 1.0)
    fig, (ax, cx, bx) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.5, 1.2, 1]})

    def draw(axis, x_of):
        axis.scatter([x_of(t) for t in good], [t.value for t in good], s=22, color="tab:blue", label="complete",
                     zorder=3)
        if pruned:
            axis.scatter([x_of(t) for t in pruned], [pvals[t.number] for t in pruned], s=22, marker="v",
                         color="tab:gray", label="pruned (last report)", zorder=3)
        if div:       # penalties would squash the scale: drawn at the top edge instead
            axis.scatter([x_of(t) for t in div], [hi] * len(div), s=40, marker="^", color="tab:red",
                         label="diverged (off scale)", zorder=4, clip_on=False)
        axis.set_ylim(lo, hi)
        axis.grid(alpha=0.3)

    draw(ax, lambda t: t.number)
    best, xs, ys = math.inf, [], []
    for t in sorted(good, key=lambda t: t.number):
        best = min(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        xs.append(max(t.number for t in trials))
        ys.append(best)
        ax.step(xs, ys, where="post", color="tab:orange", label=f"best so far ({best:.4g})")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation loss")
    ax.set_title(f"optimisation history: {study.study_name}")
    ax.legend(fontsize=8)

    lr_trials = [t for t in good + div + pruned if "lr" in t.params]
    if lr_trials:
        draw(cx, lambda t: t.params.get("lr", float("nan")))
        cx.set_xscale("log", base=2)
        cx.set_xlabel("lr (proxy)")
        cx.set_title("loss against the learning rate")
    else:
        cx.text(0.5, 0.5, "lr was not searched", ha="center", va="center")
        cx.set_axis_off()

    imp, label = importances(study)
    if len(imp) == 1:
        bx.text(0.5, 0.5, f"one searched parameter ({next(iter(imp))}):\nimportance 1 by definition",
                ha="center", va="center")
        bx.set_axis_off()
    elif imp:
        names = sorted(imp, key=imp.get)
        bx.barh(names, [imp[n] for n in names], color="tab:green")
        bx.set_xlim(0, 1)
        bx.set_xlabel("importance")
    else:
        bx.text(0.5, 0.5, "not enough complete trials\nfor importances", ha="center", va="center")
        bx.set_axis_off()
    bx.set_title(f"parameter importances ({label})" if label and len(imp) > 1 else "parameter importances")
    fig.tight_layout()
    try:
        return write_via(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110,
                                                             metadata={"Software": marker("tune plot")}))
    finally:
        plt.close(fig)
