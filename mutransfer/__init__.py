"""mutransfer: muTransfer by the spectral rule. Tune on a narrow proxy, transfer zero-shot to a wide target.

The package in layers, each importing only those before it:
  errors, atomic, outputs_guard, signals, threads, console   foundations (errors, files, processes, terminal)
  engine/    what muP is: rules, shapes, plan, parametrize
  run/       how a model is trained and measured: recipe, experiment, THE loop, batched trials, storages
  report/    what people read: tables, plots, loggers
  commands/  what users run: tune, scale, coord-check, sweep, load/export
  cli.py     flags -> one command function
"""
from . import _moved
from .errors import UserError
from .engine.hparams import HParams, TUNABLE_NAMES
from .engine.parametrize import Parametrized, attach_readout_multipliers, init_model, make_optimizer, param_groups, parametrize
from .engine.plan import ParamPlan, Plan, make_plan
from .engine.shapes import Shapes, infer_shapes
from .engine import spectral
from .commands.coord_api import coord_check
from .commands.load import export, load
from .commands.tune_api import tune

_moved.install()          # 0.1's flat import paths (mutransfer.experiment, ...) still work

__version__ = "0.1.0"
__all__ = [
    "UserError", "HParams", "TUNABLE_NAMES", "Parametrized", "parametrize", "init_model", "make_optimizer",
    "param_groups", "attach_readout_multipliers", "ParamPlan", "Plan", "make_plan", "Shapes",
    "infer_shapes", "spectral", "coord_check", "load", "export", "tune",
]
