"""The search itself, as Optuna objects: the sampler, the pruner, the study (created once, checked
against what it was tuned with) and a trial's values from the search space. Used by `tune` (a recipe)
and by `mutransfer.tune` with a user's own loop alike; no training here (batched_trials.py, train.py).
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import optuna

from ..engine.hparams import TUNABLES, HParams, unknown
from ..errors import UserError
from .batched_trials import report_every
from .recipe import Range, Recipe, Search
from .study import creation_race, open_storage, storage_lock

SAMPLERS = ("tpe", "random", "gp", "cmaes")
PRUNERS = ("median", "hyperband", "none")


def startup_trials(search: Search, trials: int) -> int:
    """Random trials before a model-based sampler (and the median pruner) acts: search.startup_trials,
    else a third of the trials between 3 and 10."""
    s = search.startup_trials
    return s if s is not None else min(10, max(3, trials // 3))


def make_sampler(kind: str, seed: Optional[int], n_startup: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(1, n_startup))
        if kind == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True,
                                          constant_liar=True)


def make_pruner(kind: str, n_startup: int, every: int = 1, total: Any = "auto") -> optuna.pruners.BasePruner:
    """`every`: steps between reports; `total`: the steps of a trial ("auto": Hyperband learns it)."""
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=every, max_resource=total, reduction_factor=3)
    # never on a trial's first report: early validation losses say little
    return optuna.pruners.MedianPruner(n_startup_trials=max(1, n_startup), n_warmup_steps=every + 1)


def sampler_for(recipe: Recipe, trials: int, seed: Optional[int]) -> optuna.samplers.BaseSampler:
    return make_sampler(recipe.search.sampler, seed, startup_trials(recipe.search, trials))


def pruner_for(recipe: Recipe, trials: int) -> optuna.pruners.BasePruner:
    return make_pruner(recipe.search.pruner, startup_trials(recipe.search, trials), report_every(recipe),
                       recipe.train.steps)


def check_space(space: dict[str, Range], where: str, base: Optional[HParams] = None) -> None:
    """Every value a search may try (a range's ends, each choice) is one of its tunable's (TUNABLES),
    and makes a valid HParams, before any trial runs. UserError naming `where`.NAME."""
    if not space:
        raise UserError(where, "is empty: name at least one tunable to search, "
                               "e.g. lr: {low: 1.0e-4, high: 1.0e-1, log: true}")
    for name, rng in space.items():
        if name not in TUNABLES:
            raise UserError(f"{where}.{name}", unknown(name))
        values = rng.choices if rng.choices is not None else [rng.low, rng.high]
        for v in values:
            why = TUNABLES[name].problem(v)
            if why:
                raise UserError(f"{where}.{name}", f"{'choices' if rng.choices is not None else 'values'} {why}, "
                                                   f"got {v!r}")
        (base or HParams()).with_values({name: values[0]})


def check_sampler(kind: str) -> None:
    if kind == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise UserError("search.sampler", "cmaes needs the `cmaes` package (pip install cmaes); "
                                              "or use tpe, gp or random") from None


def suggest(trial: optuna.Trial, space: dict[str, Range]) -> dict[str, Any]:
    """The trial's value of each tunable of the space."""
    values = {}
    for name, rng in space.items():
        if rng.choices is not None:
            values[name] = trial.suggest_categorical(name, rng.choices)
        else:
            values[name] = trial.suggest_float(name, float(rng.low), float(rng.high), log=rng.log)
    return values


def create_study(url: str, name: str, heartbeat: int, pruner: optuna.pruners.BasePruner,
                 want: Optional[dict[str, Any]] = None, where: str = "--study-name") -> tuple[optuna.Study, dict]:
    """Create or load the study `name` in `url` (two processes at once: one creates, the other loads);
    a new study records `want` as its user attributes. The study and the attributes it had before."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # trials are summarised by tune itself
    with storage_lock(url):    # two tunes on a new SQLite file: one creates, the other loads
        storage = open_storage(url, heartbeat)
        for attempt in range(8):
            try:
                study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                            load_if_exists=True, pruner=pruner)
                break
            except ValueError as e:   # e.g. an existing multi-objective study of that name
                raise UserError(where, f"{name!r}: {e}") from None
            except Exception as e:  # noqa: BLE001 - a database server: two processes creating at once
                if attempt == 7 or not creation_race(e):
                    raise
                time.sleep(0.2 + 0.3 * attempt)
        have = dict(study.user_attrs)
        if not have:
            for k, v in (want or {}).items():
                study.set_user_attr(k, v)
    return study, have


def check_comparable(have: dict, want: dict, where: dict[str, str], name: str, url: str) -> None:
    """Refuse to mix trials tuned with another width, step count, optimizer, seeds or depth."""
    for k, flag in where.items():
        if k in have and k in want and have[k] != want[k]:
            raise UserError(flag, f"study {name!r} in {url} was tuned with {k} = {have[k]}, not {want[k]}; "
                                  "its trials are not comparable (use another --study-name)")


def seeded(base: Optional[int], worker: int, study: optuna.Study) -> Optional[int]:
    """A sampler seed of its own for each worker and each resume, so none replays the same draws."""
    if base is None:
        return None
    return base + 7919 * worker + len(study.get_trials(deepcopy=False))
