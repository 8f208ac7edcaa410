"""The options of `tune`, declared once: `mutransfer tune --help` is generated from these fields
(cli.py), `mutransfer.tune(recipe, **options)` takes them as keyword arguments, and
`tuning.make_options` fills the defaults from the recipe. Light on purpose (no torch, no optuna):
the CLI imports it to build its signature."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..flags import flag


@dataclass(frozen=True)
class TuneOptions:
    """Everything a worker needs (plain data: it crosses to spawned processes). None: the recipe's
    (or the machine's) default, filled in by `tuning.make_options`."""
    recipe: Path = flag(..., "recipe YAML", argument=True)
    trials: Optional[int] = flag(None, "finished trials wanted (overrides search.trials)", min=1)
    width: Optional[int] = flag(None, "proxy width to tune at (default: widths.proxy)", min=1)
    storage: Optional[str] = flag(None, "Optuna storage URL or journal:PATH (default: sqlite in runs/<name>/)")
    study_name: Optional[str] = flag(None, "study name (default: the recipe's name)")
    workers: int = flag(1, "local worker processes sharing the storage", min=1)
    out: Optional[Path] = flag(None, "hparams file to write (default runs/<name>/hparams.yaml)")
    plot: Optional[Path] = flag(None, "PNG of optimisation history and importances")
    log: tuple[str, ...] = flag((), "tensorboard | wandb | csv (repeatable): trials there too")
    depth: Optional[int] = flag(None, "depth to tune at (recipes with depths:; default depths.proxy)", min=1)
    device: str = flag("auto", "auto | cpu | cuda (auto: a GPU when there is one)")
    parallel_trials: Optional[int] = flag(
        None, "trials trained at once in each worker, stacked (default: from memory and model size)", min=1, max=4096)
    threads: Optional[int] = flag(None, "torch threads per worker (default: the CPUs available / workers)",
                                  min=1, max=4096)
