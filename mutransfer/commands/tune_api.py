"""Tuning from Python, for users with their own training loop and no recipe:

    def train_fn(model, optimizer, report):
        for step in range(200):
            ...                       # forward, backward, optimizer.step()
            if step % 50 == 49:
                report(val_loss, step)    # pruning: raises optuna.TrialPruned when the pruner says so
        return val_loss

    best = mutransfer.tune(my_factory, train_fn, {"lr": {"low": 1e-4, "high": 1e-1, "log": True}},
                           width=128, trials=20, storage="sqlite:///study.db", study_name="mine")
    # best: the contents of an hparams file (proxy_width, optimizer, hparams, best_value, ...)

Every trial builds `factory(width=width, **args)` parametrized at that width (the proxy: a plain
model with the rule's init and the trial's multipliers) and hands model and optimizer to train_fn.
The storages, the heartbeat rule for dead workers, pruning and resume are the CLI's: rerunning with
the same storage and study name continues until `trials` trials are finished.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from ..errors import UserError
from ..engine.hparams import TUNABLE_NAMES, HParams
from ..engine.parametrize import parametrize
from ..run.recipe import Range
from ..run.study import count_finished, fail_stale, open_storage, storage_lock


def _space(space: dict[str, Any]) -> dict[str, Range]:
    out = {}
    for k, v in space.items():
        if k not in TUNABLE_NAMES:
            raise UserError(f"space.{k}", f"unknown tunable; known: {', '.join(TUNABLE_NAMES)}")
        try:
            out[k] = v if isinstance(v, Range) else Range(**v)
        except Exception as e:  # noqa: BLE001 - pydantic's message names the problem
            raise UserError(f"space.{k}", str(e).splitlines()[-1] if str(e) else "bad range") from None
    return out


def tune(factory: Callable, train_fn: Callable, space: dict[str, Any], *, width: int, trials: int,
         storage: Optional[str] = None, study_name: Optional[str] = None, args: Optional[dict] = None,
         optimizer: str = "adamw", hparams: Optional[HParams] = None, pruner: str = "median",
         sampler_seed: Optional[int] = None, heartbeat: int = 10) -> dict:
    """Run (or resume) an Optuna study of `space` at `width` until `trials` trials are finished;
    return the best trial as the contents of an hparams file (what `scale --hparams` reads)."""
    if trials < 1 or width < 1:
        raise UserError("tune", "trials and width must be >= 1")
    rng = _space(space)
    base = hparams or HParams()
    name = study_name or "mutransfer"
    url = storage or "sqlite:///mutransfer-study.db"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    prun = {"median": optuna.pruners.MedianPruner(n_startup_trials=3), "hyperband": optuna.pruners.HyperbandPruner(),
            "none": optuna.pruners.NopPruner()}[pruner]
    with storage_lock(url):
        study = optuna.create_study(storage=open_storage(url, heartbeat), study_name=name, direction="minimize",
                                    load_if_exists=True, pruner=prun,
                                    sampler=optuna.samplers.TPESampler(seed=sampler_seed))

    def objective(trial: optuna.Trial) -> float:
        values = {}
        for k, r in rng.items():
            values[k] = (trial.suggest_categorical(k, r.choices) if r.choices is not None
                         else trial.suggest_float(k, float(r.low), float(r.high), log=r.log))
        hp = base.with_values(values)
        model, opt, _ = parametrize(factory, width, width, hp, optimizer, args or {}, seed=trial.number)

        def report(value: float, step: int) -> None:
            trial.report(float(value), int(step))
            if trial.should_prune():
                raise optuna.TrialPruned(f"value {value:.4g} at step {step}")

        v = float(train_fn(model, opt, report))
        return v if math.isfinite(v) else float("inf")

    while count_finished(study) < trials:
        fail_stale(study, 3 * heartbeat)
        study.optimize(objective, n_trials=1, catch=())
    good = [t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    if not good:
        raise UserError("tune", "no trial finished with a finite value")
    best = min(good, key=lambda t: t.value)
    return {"proxy_width": width, "optimizer": optimizer, "hparams": dict(best.params), "best_value": best.value,
            "study": name, "storage": url, "trials": count_finished(study)}
