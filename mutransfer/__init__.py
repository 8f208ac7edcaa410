"""mutransfer: muTransfer by the spectral rule. Tune on a narrow proxy, transfer zero-shot to a wide target."""
from .errors import UserError
from .hparams import HParams, TUNABLE_NAMES
from .parametrize import Parametrized, attach_readout_multipliers, init_model, make_optimizer, param_groups, parametrize
from .plan import ParamPlan, Plan, make_plan
from .shapes import Shapes, infer_shapes
from . import spectral
from .coord_api import coord_check
from .load import export, load
from .tune_api import tune

__version__ = "0.1.0"
__all__ = [
    "UserError", "HParams", "TUNABLE_NAMES", "Parametrized", "parametrize", "init_model", "make_optimizer",
    "param_groups", "attach_readout_multipliers", "ParamPlan", "Plan", "make_plan", "Shapes",
    "infer_shapes", "spectral", "coord_check", "load", "export", "tune",
]
