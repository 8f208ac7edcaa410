"""`mutransfer.tune` from Python, in two forms over the CLI's implementation.

With a recipe, exactly `mutransfer tune` (the same options, by keyword; tune_options.py lists them):

    best = mutransfer.tune("recipes/quickstart.yaml", trials=20, workers=2)

With a user's own training loop and no recipe:

    def train_fn(model, optimizer, report):
        for step in range(200):
            ...                       # forward, backward, optimizer.step()
            if step % 50 == 49:
                report(val_loss, step)    # pruning: raises optuna.TrialPruned when the pruner says so
        return val_loss

    best = mutransfer.tune(my_factory, train_fn, {"lr": {"low": 1e-4, "high": 1e-1, "log": True}},
                           width=128, trials=20, storage="sqlite:///study.db", study_name="mine")

Both return the best trial as the contents of an hparams file (proxy_width, optimizer, hparams,
best_value, ...). In the second form every trial builds `factory(width=width, **args)` parametrized at
that width (the proxy: a plain model with the rule's init and the trial's multipliers) and hands model
and optimizer to train_fn. The storages, the heartbeat rule for dead workers, the sampler, the pruner
and resume are the CLI's (run/search.py, run/study.py): rerunning with the same storage and study
name continues until `trials` trials are finished.
"""
from __future__ import annotations

import math
from os import PathLike
from typing import Any, Callable, Optional

from ..engine.hparams import TUNABLES, HParams, unknown
from ..errors import UserError
from ..flags import at_least
from .tune_options import TuneOptions


def tune(recipe_or_factory: Any, train_fn: Optional[Callable] = None, space: Optional[dict[str, Any]] = None,
         **options: Any) -> dict:
    """Run (or resume) a study until enough trials are finished; the best one as an hparams file's
    contents (what `scale --hparams` reads). A recipe (path): the options of `mutransfer tune`; a model
    factory: `train_fn`, `space` and the options of `tune_loop`."""
    if isinstance(recipe_or_factory, (str, PathLike)):
        if train_fn is not None or space is not None:
            raise UserError("tune", "with a recipe, give only options by keyword (train_fn and space are for a factory)")
        return tune_recipe(recipe_or_factory, **options)
    if train_fn is None or space is None:
        raise UserError("tune", "give a recipe path, or a model factory with train_fn and space")
    return tune_loop(recipe_or_factory, train_fn, space, **options)


def tune_recipe(recipe: str | PathLike, **options: Any) -> dict:
    """`mutransfer tune RECIPE --option ...`: the same function with the same options."""
    from ..run.hparams_file import read_hparams_file
    from .tuning import tune_command

    code, opts = tune_command(TuneOptions(recipe=recipe, **options))
    if code:
        raise UserError("tune", f"no hparams written (exit code {code}): every trial diverged or was pruned, "
                                "or a worker failed")
    return read_hparams_file(opts.out)


def _search(space: dict[str, Any], search: dict[str, Any]):
    """The recipe's `search:` section from the space and the keyword options (trials, sampler, pruner,
    sampler_seed, heartbeat, startup_trials): validated by the same schema and checks as a recipe's."""
    from pydantic import ValidationError

    from ..run.recipe import Search
    from ..run.search import check_sampler, check_space

    for k in space:            # named before pydantic, which would place the error at `params`
        if k not in TUNABLES:
            raise UserError(f"space.{k}", unknown(k))
    try:
        s = Search.model_validate({"params": space, **search})
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not str(x).startswith("function-")]
        where = ("space." + ".".join(loc[1:])) if loc[:1] == ["params"] else ".".join(loc) or "tune"
        msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise UserError(where if loc[:1] == ["params"] else f"tune: {where}", msg) from None
    check_space(s.params, "space")
    check_sampler(s.sampler)
    return s


def tune_loop(factory: Callable, train_fn: Callable, space: dict[str, Any], *, width: int,
              storage: Optional[str] = None, study_name: Optional[str] = None, args: Optional[dict] = None,
              optimizer: str = "adamw", hparams: Optional[HParams] = None, **search: Any) -> dict:
    """The study of `space` at `width` for a user's own loop (see the module's docstring). `search`:
    the options of a recipe's `search:` section (trials, sampler, pruner, sampler_seed, heartbeat, ...)."""
    import optuna

    from ..engine.parametrize import parametrize
    from ..run.search import create_study, make_pruner, make_sampler, startup_trials, suggest
    from ..run.study import count_finished, fail_stale

    at_least(width, 1, "width")
    s = _search(space, search)
    trials, heartbeat, n0 = s.trials, s.heartbeat, startup_trials(s, s.trials)
    base = hparams or HParams()
    name, url = study_name or "mutransfer", storage or "sqlite:///mutransfer-study.db"
    study, _ = create_study(url, name, heartbeat, make_pruner(s.pruner, n0), where="study_name")
    study.sampler = make_sampler(s.sampler, s.sampler_seed, n0)

    def objective(trial: optuna.Trial) -> float:
        model, opt, _ = parametrize(factory, width, width, base.with_values(suggest(trial, s.params)), optimizer,
                                    args or {}, seed=trial.number)

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
            if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    if not good:
        raise UserError("tune", "no trial finished with a finite value")
    best = min(good, key=lambda t: t.value)
    return {"proxy_width": width, "optimizer": optimizer, "hparams": dict(best.params), "best_value": best.value,
            "study": name, "storage": url, "trials": count_finished(study)}
