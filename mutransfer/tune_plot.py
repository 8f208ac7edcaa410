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

from .outputs_guard import marker


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


def plot_study(study: optuna.Study, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    good = [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("diverged")]
    div = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("diverged")]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.scatter([t.number for t in good], [t.value for t in good], s=22, color="tab:blue", label="complete", zorder=3)
    ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
               s=22, marker="v", color="tab:gray", label="pruned (last report)", zorder=3)
    if div:
        ax.scatter([t.number for t in div], [t.value for t in div], s=30, marker="x", color="tab:red",
                   label="diverged (penalty)", zorder=3)
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
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    imp, label = importances(study)
    if imp:
        names = sorted(imp, key=imp.get)
        bx.barh(names, [imp[n] for n in names], color="tab:green")
        bx.set_xlim(0, 1)
        bx.set_xlabel("importance")
    else:
        bx.text(0.5, 0.5, "not enough complete trials\nfor importances", ha="center", va="center")
        bx.set_axis_off()
    bx.set_title(f"parameter importances ({label})" if label else "parameter importances")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110, metadata={"Software": marker("tune plot")})
    plt.close(fig)
    return p
