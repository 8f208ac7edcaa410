"""Recipes: YAML files describing model, data, widths and training, validated strictly.

Every mistake raises `UserError` naming the field path (e.g. `train.lr`). Unknown keys are errors.
Later sections (search, coord_check, sweep) are declared here too so that one schema documents all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..engine.hparams import MULTIPLIER_NAMES, SWEEPABLE, TUNABLES, unknown
from ..engine.spectral import MUON
from ..errors import UserError
from ..flags import warmup_problem
from ..yaml_io import load_yaml

LAYOUTS = ("out_in", "in_out", "embedding", "vector", "fixed", "stacked out_in", "stacked in_out", "stacked vector")


def _numeric(annotation) -> bool:
    """int, float or an Optional of them."""
    if annotation in (int, float):
        return True
    args = set(get_args(annotation)) - {type(None)}
    return get_origin(annotation) is Union and bool(args) and args <= {int, float}


class _Strict(BaseModel):
    # unknown keys are errors; inf/nan are not numbers a recipe means
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v, info):
        # YAML's `true` would pass as 1 (steps: true -> 1 step); a number field wants a number
        if isinstance(v, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("Input should be a number, not true/false")
        return v


class FactorySpec(_Strict):
    factory: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _shape(cls, v: str) -> str:
        if not (v.startswith("builtin:") or ":" in v):
            raise ValueError("must be 'builtin:NAME' or 'package.module:function'")
        return v


class ModelSpec(FactorySpec):
    # which tensor of the model's return value is the prediction (outputs.py): an index or a key
    output: Optional[Union[int, str]] = None
    # hf:<model_type> factories only (hf.py documents each)
    task: Literal["causal-lm", "masked-lm", "sequence-classification", "image-classification", "base"] = "causal-lm"
    width_fields: dict[str, float] = Field(default_factory=dict)
    round_to: int = Field(default=1, ge=1)
    heads_field: Optional[str] = None
    head_dim: Optional[int] = Field(default=None, ge=1)
    kv_heads_field: Optional[str] = None
    kv_groups: int = Field(default=1, ge=1)
    attn_implementation: Optional[Literal["eager", "sdpa"]] = None
    # the factory keyword (hf: the config field) that sets the depth when `depths:` is given
    depth_arg: Optional[str] = None

    @field_validator("width_fields")
    @classmethod
    def _wf(cls, v):
        for k, m in v.items():
            if isinstance(m, bool) or not m > 0:
                raise ValueError(f"{k}: multiplier must be a number > 0, got {m!r}")
        return v

    @model_validator(mode="after")
    def _hf_only(self) -> "ModelSpec":
        hf = self.factory.startswith("hf:")
        set_ = [k for k in ("width_fields", "heads_field", "head_dim", "kv_heads_field", "attn_implementation")
                if getattr(self, k)] + [k for k, d in (("round_to", 1), ("kv_groups", 1), ("task", "causal-lm"))
                                        if getattr(self, k) != d]
        if set_ and not hf:
            raise ValueError(f"{set_[0]} applies to hf: factories only")
        if hf and not self.width_fields:
            raise ValueError("an hf: factory needs width_fields (the config fields that grow with width)")
        if (self.heads_field is None) != (self.head_dim is None):
            raise ValueError("heads_field and head_dim go together")
        if self.kv_heads_field and not self.heads_field:
            raise ValueError("kv_heads_field needs heads_field and head_dim")
        return self

    @field_validator("output", mode="before")
    @classmethod
    def _output(cls, v):
        if isinstance(v, bool) or not (v is None or isinstance(v, (int, str))):
            raise ValueError(f"must be an integer index or a key name, got {v!r}")
        return v


MAX_WIDTH = 2**24     # 16M: far beyond any model; catches 1e40 before torch does


MAX_MODEL_DEPTH = 100_000   # blocks: far beyond any model; catches 1e8 before a block is built


class Depths(_Strict):
    proxy: int = Field(gt=0, le=MAX_MODEL_DEPTH)
    target: int = Field(gt=0, le=MAX_MODEL_DEPTH)
    alpha: float = Field(default=1.0, ge=0, le=1)    # 1: CompleteP, 0.5: depth-muP

    @model_validator(mode="after")
    def _order(self) -> "Depths":
        if self.proxy > self.target:
            raise ValueError(f"proxy depth ({self.proxy}) is above target depth ({self.target})")
        return self


class Widths(_Strict):
    proxy: int = Field(gt=0, le=MAX_WIDTH)
    target: int = Field(gt=0, le=MAX_WIDTH)

    @model_validator(mode="after")
    def _order(self) -> "Widths":
        if self.proxy > self.target:
            raise ValueError(f"proxy width ({self.proxy}) is above target width ({self.target})")
        return self


class Train(_Strict):
    # sgd | adam | adamw | muon, a torch.optim class name (Adafactor), or "package.module:Class"
    optimizer: str = "adamw"
    # a named class's update family (engine/optimizers.py; classes it knows need none)
    optimizer_kind: Optional[Literal["adam", "sign", "relative", "sgd", "orthogonal"]] = None
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    lr: float = Field(gt=0)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0
    momentum: float = Field(default=0.0, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    init_scale: float = Field(default=1.0, gt=0)
    multipliers: dict[str, float] = Field(default_factory=dict)
    zero_readout: bool = False
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    grad_clip: Optional[float] = Field(default=None, gt=0)
    grad_accum: int = Field(default=1, ge=1)
    eval_every: int = Field(default=0, ge=0)
    eval_batches: int = Field(default=4, ge=1)
    log_every: int = Field(default=10, ge=1)
    # optimizer: muon (hidden matrices by torch.optim.Muon, the rest by AdamW)
    adam_lr: Optional[float] = Field(default=None, gt=0)     # AdamW's LR (default 1e-3)
    muon_momentum: float = Field(default=0.95, ge=0, lt=1)
    nesterov: bool = True
    ns_steps: int = Field(default=5, ge=1, le=20)
    # more 2-D matrices for Muon than the hidden ones (globs; e.g. a bottleneck width -> 32)
    muon_params: list[str] = Field(default_factory=list)
    # auxiliary losses added to the objective: key of the model's output -> coefficient (an MoE's
    # load-balancing `aux_loss`, a router `z_loss`); logged separately, not in the validation loss
    aux_losses: dict[str, float] = Field(default_factory=dict)

    @field_validator("aux_losses")
    @classmethod
    def _aux(cls, v):
        for k, c in v.items():
            if not (c >= 0 and c < float("inf")):
                raise ValueError(f"coefficient of {k!r} must be a finite number >= 0, got {c}")
        return v

    @model_validator(mode="after")
    def _named_optimizer(self) -> "Train":
        from .user_code import register_optimizer  # imports the class: UserError names train.optimizer
        register_optimizer(self.optimizer, self.optimizer_kind, self.optimizer_args)
        return self

    @field_validator("optimizer")
    @classmethod
    def _muon_available(cls, v):
        if v == MUON:
            import torch
            if not hasattr(torch.optim, "Muon"):
                raise ValueError(f"muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        for b in v:
            if not 0 <= b < 1:
                raise ValueError("each beta must be in [0, 1)")
        return v

    @field_validator("multipliers")
    @classmethod
    def _mults(cls, v: dict[str, float]):
        for k, x in v.items():
            if k not in MULTIPLIER_NAMES:
                raise ValueError(f"unknown multiplier {k!r}; known: {', '.join(MULTIPLIER_NAMES)}")
            if TUNABLES[k].problem(x):
                raise ValueError(f"multiplier {k} {TUNABLES[k].problem(x)}")
        return v

    @model_validator(mode="after")
    def _warmup(self) -> "Train":
        if warmup_problem(self.warmup, self.steps):
            raise ValueError(warmup_problem(self.warmup, self.steps))
        return self


class Measure(_Strict):
    """`tune` measures the horizon (and batch) exponent on the proxy after its search (horizon_fit)."""
    horizons: Optional[list[int]] = None       # steps; default train.steps x (1, 2, 4)
    batch_sizes: Optional[list[int]] = None    # default: none (the batch exponent from the rule)
    points: int = Field(default=6, ge=4, le=16)           # LRs per horizon, half an octave apart
    seeds: int = Field(default=2, ge=1, le=16)

    @field_validator("horizons", "batch_sizes")
    @classmethod
    def _ladder(cls, v):
        if v is not None:
            if len(set(v)) < 2:
                raise ValueError(f"needs at least 2 different values to fit an exponent, got {v}")
            if any(x <= 0 for x in v):
                raise ValueError(f"values must be > 0, got {v}")
        return v


class Target(_Strict):
    """How the target trains when that differs from the proxy (engine/horizon.py): its horizon (steps,
    or tokens per parameter) and batch size, and which rule moves LR, decay, warmup, eps and betas."""
    steps: Optional[int] = Field(default=None, gt=0, le=10**9)
    tokens_per_param: Optional[float] = Field(default=None, gt=0, le=1e6)
    count: Literal["non_embedding", "all"] = "non_embedding"   # which parameters tokens_per_param counts
    batch_size: Optional[int] = Field(default=None, gt=0, le=10**8)
    rules: bool = True                                        # false: keep the proxy's settings (no rule)
    horizon_exponent: Optional[float] = Field(default=None, ge=-2, le=2)   # gamma; default: measured, else 0.32
    batch_exponent: Optional[float] = Field(default=None, ge=-2, le=2)     # beta at fixed steps
    decay: Literal["tau", "fixed"] = "tau"
    warmup: Literal["fraction", "fixed"] = "fraction"
    eps: Literal["sqrt", "fixed"] = "sqrt"
    betas: Literal["keep", "half_life"] = "keep"
    measure: Optional[Measure] = None

    @model_validator(mode="after")
    def _one_horizon(self) -> "Target":
        if self.steps is not None and self.tokens_per_param is not None:
            raise ValueError("give steps or tokens_per_param, not both")
        return self


class Range(_Strict):
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _one(self) -> "Range":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
        else:
            if self.low is None or self.high is None:
                raise ValueError("needs low and high (or choices)")
            if not self.low < self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError("a log range needs low > 0")
        return self


class Search(_Strict):
    trials: int = Field(default=20, gt=0)
    params: dict[str, Range] = Field(default_factory=dict)
    sampler: Literal["tpe", "random", "gp", "cmaes"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    seeds: int = Field(default=1, gt=0)
    sampler_seed: Optional[int] = None
    divergence_factor: float = Field(default=3.0, gt=1)
    # tune: validation-loss reports for pruning every N steps (default train.eval_every, else steps // 5)
    report_every: Optional[int] = Field(default=None, gt=0)
    # tune: random trials before TPE/GP/CMA-ES model the space, and before the median pruner acts
    startup_trials: Optional[int] = Field(default=None, ge=0)
    # tune: seconds between heartbeats; a running trial silent for 3x this is a dead worker's (FAIL)
    heartbeat: int = Field(default=10, gt=0)

    @field_validator("params")
    @classmethod
    def _names(cls, v: dict[str, Range]):
        for k in v:
            if k not in TUNABLES:
                raise ValueError(unknown(k))
        return v


class CoordCheck(_Strict):
    widths: Optional[list[int]] = None
    steps: int = Field(default=5, gt=0)
    seeds: int = Field(default=3, gt=0)
    lr: Optional[float] = Field(default=None, gt=0)
    batch_size: Optional[int] = Field(default=None, gt=0)

    @field_validator("widths")
    @classmethod
    def _w(cls, v):
        if v is not None:
            if len(v) < 2:
                raise ValueError("needs at least 2 widths")
            if any(w <= 0 for w in v):
                raise ValueError("widths must be > 0")
        return v


class Sweep(_Strict):
    widths: Optional[list[int]] = None
    lrs: Optional[list[float]] = None
    seeds: int = Field(default=1, gt=0)
    steps: Optional[int] = Field(default=None, gt=0)
    param: str = "lr"                                      # or another of hparams.SWEEPABLE
    values: Optional[list[float]] = None                   # the grid when param is not lr
    parametrization: Literal["mup", "sp", "both"] = "both"
    batch_size: Optional[int] = Field(default=None, gt=0)  # default: train.batch_size
    average_last: Optional[int] = Field(default=None, gt=0)  # steps averaged for the loss (default 10%, >= 5)
    divergence_factor: float = Field(default=3.0, gt=1)

    @field_validator("widths")
    @classmethod
    def _w(cls, v):
        if v is not None and (not v or any(w <= 0 for w in v)):
            raise ValueError("widths must be a non-empty list of integers > 0")
        return v

    @field_validator("lrs", "values")
    @classmethod
    def _pos(cls, v):
        if v is not None and (not v or any(not x > 0 for x in v)):
            raise ValueError("must be a non-empty list of numbers > 0")
        return v

    @field_validator("param")
    @classmethod
    def _param(cls, v):
        if v not in SWEEPABLE:
            raise ValueError(f"cannot sweep {v!r}; sweepable: {', '.join(SWEEPABLE)}")
        return v


class Recipe(_Strict):
    # a folder name under runs/: no path separators, not "." or ".." or hidden
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
    model: ModelSpec
    data: FactorySpec
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    widths: Widths
    train: Train
    layouts: dict[str, Literal["out_in", "in_out", "embedding", "vector", "fixed",
                               "stacked out_in", "stacked in_out", "stacked vector"]] = Field(
        default_factory=dict
    )
    # depth transfer (depth.py): the proxy's and the target's depth and the exponent alpha
    depths: Optional[Depths] = None
    # globs of module names that are residual branches, when tracing cannot see them (branches.py)
    residual_branches: list[str] = Field(default_factory=list)
    # keep the factory's own init at the proxy (true, or globs of parameter names), transferred to
    # other widths by the rule's ratio, instead of the rule's formula (plan.make_plan)
    factory_init: Union[bool, list[str]] = False
    # the target's horizon and batch, and the rules that move LR, decay and warmup to them (horizon.py)
    target: Optional[Target] = None
    search: Search = Field(default_factory=Search)
    coord_check: CoordCheck = Field(default_factory=CoordCheck)
    sweep: Sweep = Field(default_factory=Sweep)

    # where the recipe came from (not a YAML key)
    _path: Optional[Path] = None
    # the depth this recipe object builds at (experiment.at_depth); None: depths.proxy
    _depth: Optional[int] = None

    @model_validator(mode="after")
    def _depth_arg(self) -> "Recipe":
        if self.depths is not None:
            arg = depth_arg(self)
            if arg in self.model.args:
                raise ValueError(f"model.args.{arg} and depths: both set the depth; remove model.args.{arg}")
        elif self.residual_branches:
            raise ValueError("residual_branches applies only with depths:")
        return self

    @property
    def path(self) -> Optional[Path]:
        return self._path


def depth_arg(recipe: "Recipe") -> str:
    """The keyword the model factory takes its depth by: model.depth_arg, a built-in's own, or `depth`."""
    m = recipe.model
    if m.depth_arg:
        return m.depth_arg
    if m.factory.startswith("builtin:"):
        from ..models import BUILTIN_DEPTH_ARGS
        return BUILTIN_DEPTH_ARGS.get(m.factory.split(":", 1)[1], "depth")
    if m.factory.startswith("hf:"):
        return "num_hidden_layers"
    return "depth"


def _format_loc(loc: tuple) -> str:
    return ".".join(str(x) for x in loc) or "(top level)"


def _first_error(e: ValidationError) -> tuple[str, str]:
    errs = e.errors()
    # a misspelled key (`träin:`) also makes the real one "missing": name the unknown key first
    err = next((x for x in errs if x["type"] == "extra_forbidden"), errs[0])
    loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required field is missing"
    else:
        given = err.get("input")
        if not isinstance(given, (dict, list)) and "got" not in msg:
            msg = f"{msg.removeprefix('Value error, ')} (got {given!r})"
    msg = msg.removeprefix("Value error, ")
    return _format_loc(loc), msg


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(source, "a recipe must be a YAML mapping")
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        where, msg = _first_error(e)
        raise UserError(f"{source}: {where}", msg) from None
    return r


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    data = load_yaml(p, "recipe")
    r = parse_recipe(data, str(p))
    r._path = p
    return r


def recipe_to_dict(r: Recipe) -> dict:
    return r.model_dump(mode="json")
