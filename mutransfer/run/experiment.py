"""From a recipe to the things a command trains: factories, data streams, the parametrized model and
the TrainConfig. Every command goes through here and then through train.train()."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator, Optional

import torch

from ..data import BUILTIN_DATA
from ..engine import horizon as horizon_rule
from ..engine import optimizers
from ..engine.hparams import HParams
from ..engine.outputs import OutputError, check_against_targets, select
from ..engine.parametrize import Parametrized, parametrize
from ..engine.plan import MUP
from ..engine.shapes import Shapes, infer_shapes
from ..errors import UserError
from ..models import BUILTIN_MODELS, hf
from .recipe import MAX_MODEL_DEPTH, Recipe, depth_arg
from .train import TrainConfig
from .user_code import accepts, resolve_factory


def depth_of(recipe: Recipe) -> Optional[int]:
    """The depth this recipe object builds at (None without `depths:`)."""
    if recipe.depths is None:
        return None
    return recipe._depth if recipe._depth is not None else recipe.depths.proxy


def at_depth(recipe: Recipe, depth: int, where: str = "--depth") -> Recipe:
    """A copy of the recipe that builds its model at `depth` (needs `depths:`)."""
    if recipe.depths is None:
        raise UserError(where, "the recipe has no depths: section")
    if depth < 1:
        raise UserError(where, f"must be >= 1, got {depth}")
    if depth > MAX_MODEL_DEPTH:       # the recipe's own bound: checked before a block is built
        raise UserError(where, f"{depth} is above {MAX_MODEL_DEPTH:,}, the largest depth a recipe may name")
    r = recipe.model_copy(deep=True)
    r._path, r._depth = recipe._path, depth
    return r


def model_args(recipe: Recipe) -> dict[str, Any]:
    """The factory's keyword arguments: model.args, plus the depth when the recipe has `depths:`."""
    d = depth_of(recipe)
    if d is None:
        return dict(recipe.model.args)
    return {**recipe.model.args, depth_arg(recipe): d}


def depth_rule(recipe: Recipe, base_depth: Optional[int] = None, use_rule: bool = True):
    """(base depth, depth, alpha) for the plan, or None without `depths:`; use_rule=False gives the
    control (every depth multiplier 1, the width rule unchanged)."""
    d = depth_of(recipe)
    if d is None:
        return None
    base = base_depth or recipe.depths.proxy
    return (base, d, recipe.depths.alpha) if use_rule else (d, d, recipe.depths.alpha)


def recipe_dirs(recipe: Recipe) -> list:
    """Folders the recipe's own code is looked up in besides the working directory: the recipe's."""
    return [recipe.path.resolve().parent] if recipe.path is not None else []


def model_factory(recipe: Recipe) -> Callable:
    if hf.is_hf(recipe.model.factory):
        return hf.make_factory(recipe.model)
    fn = resolve_factory(recipe.model.factory, "model.factory", BUILTIN_MODELS, recipe_dirs(recipe))
    if not accepts(fn, "width"):
        raise UserError("model.factory", f"{recipe.model.factory!r} does not take a `width` argument")
    return fn


def data_factory(recipe: Recipe) -> Callable:
    fn = resolve_factory(recipe.data.factory, "data.factory", BUILTIN_DATA, recipe_dirs(recipe))
    for a in ("batch_size", "seed"):
        if not accepts(fn, a):
            raise UserError("data.factory", f"{recipe.data.factory!r} does not take a `{a}` argument")
    return fn


def data_stream(recipe: Recipe, split: str, seed: int, batch_size: Optional[int] = None) -> Iterator:
    """An infinite iterator of (inputs, targets); split is passed when the factory takes it."""
    fn = data_factory(recipe)
    kw: dict[str, Any] = dict(recipe.data.args)
    if accepts(fn, "split"):
        kw["split"] = split
    elif split == "val":
        seed = seed + 1_000_003  # no split support: a disjoint-seeded stream stands in for validation
    if fn is BUILTIN_DATA.get("tokens") and "vocab_size" not in kw:     # token ids checked against the model's
        v = next((recipe.model.args[k] for k in ("vocab_size", "vocab") if k in recipe.model.args), None)
        if isinstance(v, int) and not isinstance(v, bool):
            kw["vocab_size"] = v
    try:
        it = iter(fn(batch_size=batch_size or recipe.train.batch_size, seed=seed, **kw))
    except UserError:
        raise
    except TypeError as e:
        raise UserError("data.args", f"data factory call failed: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise UserError("data", f"data factory failed: {type(e).__name__}: {e}") from None
    except SystemExit as e:
        raise UserError("data.factory", f"the data factory called sys.exit({e.code!r})") from None
    return it


def first_batch(it: Iterator, where: str = "data") -> tuple:
    try:
        b = next(it)
    except StopIteration:
        raise UserError(where, "the data iterator is empty (it must be infinite)") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(where, f"the data iterator failed: {type(e).__name__}: {e}") from None
    if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(torch.is_tensor(t) for t in b)):
        raise UserError(where, "each batch must be a pair of tensors (inputs, targets)")
    return tuple(b)


def val_batches(recipe: Recipe, n: int, seed: int = 0, batch_size: Optional[int] = None) -> list:
    """A fixed list of validation batches (the same at every width and trial)."""
    it = data_stream(recipe, "val", seed, batch_size)
    return [first_batch(it, "data")] + [next(it) for _ in range(n - 1)]


def train_config(recipe: Recipe, device: str = "cpu", steps: Optional[int] = None, **over) -> TrainConfig:
    t = recipe.train
    cfg = TrainConfig(
        steps=steps or t.steps, loss=recipe.loss, schedule=t.schedule, warmup=t.warmup,
        min_lr_ratio=t.min_lr_ratio, grad_clip=t.grad_clip, grad_accum=t.grad_accum,
        eval_every=t.eval_every, eval_batches=t.eval_batches, log_every=t.log_every, device=device,
        output=recipe.model.output, aux_losses=dict(t.aux_losses),
    )
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def shapes_for(recipe: Recipe, width: int, base_width: Optional[int] = None) -> Shapes:
    """Width inference for this recipe, cached per (model spec, base width, width): coord-check,
    sweep and tune build the same widths many times."""
    base = base_width or recipe.widths.proxy
    key = (json.dumps([recipe.model.model_dump(mode="json"), recipe.layouts, model_args(recipe),
                       recipe.residual_branches, recipe.depths is not None], sort_keys=True, default=repr),
           base, width)
    hit = _SHAPES_CACHE.get(key)
    if hit is None:
        hit = infer_shapes(model_factory(recipe), model_args(recipe), base, width, recipe.layouts,
                           example=example_input(recipe), branches=recipe.depths is not None,
                           branch_globs=recipe.residual_branches)
        if len(_SHAPES_CACHE) >= 64:
            _SHAPES_CACHE.pop(next(iter(_SHAPES_CACHE)))
        _SHAPES_CACHE[key] = hit
    return hit


_SHAPES_CACHE: dict[tuple, Shapes] = {}


def example_input(recipe: Recipe):
    """The inputs of one small training batch: what the layout trace runs the model on."""
    x, _ = first_batch(data_stream(recipe, "train", recipe.train.seed, batch_size=2))
    return x


def build(recipe: Recipe, width: int, hparams: Optional[HParams] = None, device: str = "cpu",
          seed: Optional[int] = None, parametrization: str = MUP, base_width: Optional[int] = None,
          optimizer: Optional[str] = None, base_depth: Optional[int] = None, depth_rule_on: bool = True,
          with_optimizer: bool = True, horizon=None) -> Parametrized:
    """The parametrized model at `width` (and the recipe's current depth) for this recipe, relative to
    its proxy width (and depth). `optimizer` overrides recipe.train.optimizer (sgd | adam | adamw).
    `horizon` (horizon_factors) moves the optimizer's settings to another horizon and batch size."""
    hp = hparams or HParams.from_train(recipe.train)
    base = base_width or recipe.widths.proxy
    return parametrize(
        model_factory(recipe), width, base, hp, optimizer or recipe.train.optimizer,
        model_args(recipe), recipe.layouts, device, recipe.train.seed if seed is None else seed, parametrization,
        shapes=shapes_for(recipe, width, base), factory_init=recipe.factory_init,
        depth=depth_rule(recipe, base_depth, depth_rule_on), muon_params=tuple(recipe.train.muon_params),
        with_optimizer=with_optimizer, horizon=horizon,
    )


def check_fits(recipe: Recipe, width: int, where: str, device: str = "cpu") -> None:
    """The model at `width` must fit: fp32 weights, gradients and optimizer state against the
    machine's memory (CPU) or the GPU's. Found on the meta device, before anything is trained."""
    numel = sum(math.prod(p.shape) for p in shapes_for(recipe, width).params.values())
    state = {"sgd": 1 if recipe.train.momentum else 0}.get(recipe.train.optimizer, 2)   # adam(w), muon: <= 2
    need = numel * 4 * (2 + state)
    have = None
    try:
        if device.startswith("cuda") and torch.cuda.is_available():
            have = torch.cuda.mem_get_info()[1]
        else:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return
    if have and need > have:
        raise UserError(where, f"width {width}: {numel:,} parameters need {need / 2**30:.3g} GiB for weights, "
                        f"gradients and optimizer state; this machine has {have / 2**30:.3g} GiB")


def resolve_device(device: str) -> str:
    """auto | cpu | cuda | cuda:N, checked against this machine before anything is created."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError("--device", f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device", f"{device} requested but no GPU is available (torch {torch.__version__}"
                            + (", built without CUDA)" if torch.version.cuda is None else ")"))
        if device.startswith("cuda:"):
            n = device[5:]
            if not n.isdigit():
                raise UserError("--device", f"unknown device {device!r}; expected cuda:N with N a GPU index")
            if int(n) >= torch.cuda.device_count():
                raise UserError("--device", f"{device}: this machine has {torch.cuda.device_count()} GPU(s) "
                                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_recipe(recipe: Recipe) -> None:
    """Everything that can be checked without training: factories, shapes at both widths, one batch,
    and the model's output on it (check_model_output)."""
    shapes_for(recipe, recipe.widths.target)
    it = data_stream(recipe, "train", recipe.train.seed, batch_size=2)
    train_batch = first_batch(it)
    check_model_output(recipe, train_batch)
    val_batch = first_batch(data_stream(recipe, "val", recipe.train.seed, batch_size=2), "data (validation)")
    check_batches_agree(train_batch, val_batch)
    check_model_output(recipe, val_batch, where="data (validation)")
    check_plan(recipe, recipe.widths.proxy)


def check_plan(recipe: Recipe, width: int) -> None:
    """The plan at `width` can be made: every glob field (factory_init, train.muon_params) matches a
    parameter. On the meta device (the traced shapes), before a study, a run folder or a cache exists."""
    from ..engine.plan import make_plan
    make_plan(shapes_for(recipe, width), HParams.from_train(recipe.train), recipe.train.optimizer, MUP,
              recipe.factory_init, depth_rule(recipe), tuple(recipe.train.muon_params))


def check_batches_agree(train: tuple, val: tuple) -> None:
    """Validation batches must look like training batches (all but the batch dimension, dtypes)."""
    for i, what in ((0, "inputs"), (1, "targets")):
        a, b = train[i], val[i]
        if tuple(a.shape[1:]) != tuple(b.shape[1:]) or a.dtype != b.dtype:
            raise UserError("data (validation)", f"validation {what} {tuple(b.shape)} {b.dtype} do not match "
                            f"training {what} {tuple(a.shape)} {a.dtype} (beyond the batch dimension)")


REAL_CHECK_PARAMS = 20_000_000   # up to this size the first batch also runs on the CPU (about 80 MB)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in list(x.items())[:4]) + "}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in x[:4]) + ")"
    return type(x).__name__


def check_model_output(recipe: Recipe, batch: tuple, width: Optional[int] = None, where: str = "data") -> None:
    """One forward pass of the model at the proxy width (on the meta device when it runs there, else
    on the CPU) on `batch`: model.output must select a prediction that the loss can score against the
    targets. UserError naming model.output otherwise, before anything is trained or written."""
    x, y = batch
    w = width or recipe.widths.proxy
    factory = model_factory(recipe)
    out = None
    try:
        with torch.device("meta"), torch.no_grad():
            meta_model = factory(width=w, **model_args(recipe))
            out = meta_model(x.to("meta"))
        dev_y = y.to("meta")
        # the meta device does not check dtypes (Long inputs into a float Linear pass there): a small
        # model runs for real on the CPU too
        if sum(p.numel() for p in meta_model.parameters()) <= REAL_CHECK_PARAMS:
            out = None
    except Exception:  # noqa: BLE001 - data-dependent forward passes need real tensors
        out = None
    if out is None:
        try:
            with torch.no_grad():
                m = factory(width=w, **model_args(recipe))
                m.eval()
                out = m(x)
        except Exception as e:  # noqa: BLE001
            raise UserError("model", f"the forward pass failed on the first batch at width {w} (inputs "
                            f"{_describe(x)}): {type(e).__name__}: {str(e)[:200]}") from None
        dev_y = y
    try:
        pred = select(out, recipe.model.output)
    except OutputError as e:
        raise UserError("model.output", str(e)) from None
    why = check_against_targets(pred, dev_y, recipe.loss)
    if why:
        hint = f"{recipe.model.output!r} " if recipe.model.output is not None else ""
        raise UserError("model.output", f"{hint}selects a {why}")
    why = target_problem(y, pred.shape[-1] if pred.dim() else 1, recipe.loss)
    if why:
        raise UserError(where, why)


def target_problem(y: torch.Tensor, classes: int, loss: str) -> Optional[str]:
    """Why targets `y` cannot be scored by `loss` against `classes` outputs (None when they can)."""
    if loss == "cross_entropy":
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            return f"targets have dtype {y.dtype}; cross_entropy wants integer class indices"
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            return (f"targets out of range: min {int(y.min())}, max {int(y.max())}, but the model has "
                    f"{classes} outputs (class indices must be in [0, {classes}))")
    elif not (y.is_floating_point() or y.dtype in (torch.int64, torch.int32)):
        return f"targets have dtype {y.dtype}; mse wants numbers"
    return None


# ----------------------------------------------------------------------------------- horizon and batch

def tokens_per_sample(recipe: Recipe) -> int:
    """Predicted tokens per sample (the targets' elements per batch row): seq_len for a language model."""
    _, y = first_batch(data_stream(recipe, "train", recipe.train.seed, batch_size=2))
    return max(1, y.numel() // max(1, y.shape[0] if y.dim() else 1))


def counted_params(recipe: Recipe, width: int, count: str = "non_embedding") -> int:
    """The parameters a tokens-per-parameter horizon counts: all, or all but the tables (embeddings,
    position tables: parameters used by lookup, whose compute does not grow with them)."""
    ps = shapes_for(recipe, width).params.values()
    return sum(math.prod(p.shape) for p in ps if count == "all" or p.layout != "embedding")


def target_run(recipe: Recipe, width: int, steps: Optional[int] = None, batch: Optional[int] = None,
               flag_steps: str = "--steps", flag_batch: str = "--batch-size") -> tuple[int, int]:
    """The target's (steps, batch size): flags over `target:` over the proxy's train section."""
    t = recipe.target
    b = batch if batch is not None else (t.batch_size if t is not None and t.batch_size else recipe.train.batch_size)
    if b <= 0:
        raise UserError(flag_batch, f"must be > 0, got {b}")
    if steps is not None:
        s = steps
    elif t is not None and t.steps:
        s = t.steps
    elif t is not None and t.tokens_per_param:
        n = counted_params(recipe, width, t.count)
        s = horizon_rule.steps_for_tokens(t.tokens_per_param, n, b * recipe.train.grad_accum,
                                          tokens_per_sample(recipe))
    else:
        s = recipe.train.steps
    if s <= 0:
        raise UserError(flag_steps, f"must be > 0, got {s}")
    return s, b


def horizon_factors(recipe: Recipe, steps: int, batch: int, proxy_steps: Optional[int] = None,
                    proxy_batch: Optional[int] = None, measured: Optional[dict] = None,
                    rules_on: Optional[bool] = None) -> horizon_rule.Factors:
    """The horizon and batch factors from the proxy's run (the hparams file's steps and batch, else
    the recipe's train section) to (steps, batch). measured: the hparams file's `horizon` section.
    rules_on overrides target.rules (sweep's two arms). Without a `target:` section the rules are off
    (the proxy's settings kept, as before the horizon axis existed) unless rules_on is True."""
    t = recipe.target
    # without a target: section nothing changes (the rules are off) unless rules_on says otherwise
    rules = horizon_rule.Rules(enabled=False) if t is None else horizon_rule.Rules(
        t.horizon_exponent, t.batch_exponent, t.decay, t.warmup, t.eps, t.betas, t.rules)
    if t is None and rules_on:
        rules = horizon_rule.Rules()
    if rules_on is not None:
        rules = horizon_rule.Rules(**{**rules.__dict__, "enabled": rules_on})
    m = measured or {}
    proxy = horizon_rule.Run(proxy_steps or recipe.train.steps, proxy_batch or recipe.train.batch_size,
                             recipe.train.warmup)
    family = optimizers.family(recipe.train.optimizer)     # a named class: its update family's rule
    return horizon_rule.factors(family, proxy, horizon_rule.Run(steps, batch), rules,
                                _num(m.get("exponent")), _num(m.get("batch_exponent")), tuple(recipe.train.betas))


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None
