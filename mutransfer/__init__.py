"""mutransfer: muTransfer by the spectral rule. Tune on a narrow proxy, transfer zero-shot to a wide target.

The package in layers, each importing only those before it:
  errors, atomic, outputs_guard, signals, threads, console   foundations (errors, files, processes, terminal)
  engine/    what muP is: rules, shapes, plan, parametrize
  run/       how a model is trained and measured: recipe, experiment, THE loop, batched trials, storages
  report/    what people read: tables, plots, loggers
  commands/  what users run: tune, scale, coord-check, sweep, load/export
  cli.py     flags -> one command function

The names below are imported when first used (PEP 562), so `import mutransfer; mutransfer.parametrize(...)`
loads torch but neither optuna, pydantic nor yaml.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> the module (relative to this package) that defines it
_HOME = {
    "UserError": "errors",
    "HParams": "engine.hparams", "TUNABLE_NAMES": "engine.hparams",
    "Parametrized": "engine.parametrize", "attach_readout_multipliers": "engine.parametrize",
    "init_model": "engine.parametrize", "make_optimizer": "engine.parametrize",
    "param_groups": "engine.parametrize", "parametrize": "engine.parametrize",
    "ParamPlan": "engine.plan", "Plan": "engine.plan", "make_plan": "engine.plan",
    "Shapes": "engine.shapes", "infer_shapes": "engine.shapes",
    "coord_check": "commands.coord_api",
    "load": "commands.trained", "export": "commands.trained",
    "tune": "commands.tune_api",
}
_MODULES = {"spectral": "engine.spectral"}

__all__ = [   # = the keys of _HOME and _MODULES (tests/test_architecture.py); a literal for linters and IDEs
    "UserError", "HParams", "TUNABLE_NAMES", "Parametrized", "attach_readout_multipliers", "init_model",
    "make_optimizer", "param_groups", "parametrize", "ParamPlan", "Plan", "make_plan", "Shapes", "infer_shapes",
    "coord_check", "load", "export", "tune", "spectral",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{_MODULES[name]}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value       # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .commands.coord_api import coord_check
    from .commands.trained import export, load
    from .commands.tune_api import tune
    from .engine import spectral
    from .engine.hparams import TUNABLE_NAMES, HParams
    from .engine.parametrize import (
        Parametrized,
        attach_readout_multipliers,
        init_model,
        make_optimizer,
        param_groups,
        parametrize,
    )
    from .engine.plan import ParamPlan, Plan, make_plan
    from .engine.shapes import Shapes, infer_shapes
    from .errors import UserError
