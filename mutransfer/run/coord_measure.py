"""Coordinate check, measurement: train the recipe's model a few steps at several widths (or depths) and
record, on one fixed probe batch at t = 0..N optimizer steps, for every module (the root module, i.e.
the model's output, and identity "hook point" modules included)
    act     mean |x_t|          the size of the output's coordinates,
    update  mean |x_t - x_0|    the size of their change since initialisation
(Desideratum 1 of the spectral paper: both Theta(1) in width), the attention sites' (d_head, scale)
(coord_attention.py) and every matrix's spectral ratios (coord_spectral.py). Training goes through
train.train(); the probe runs from a callback, under torch.no_grad, in eval mode and with the RNG state
forked, and its hooks exist only while it runs, so it cannot change the training.

The CLI (`measure`, from a recipe) and the Python API (commands/coord_api.py, from a factory and
batches) both measure one model through `measure_model`. Finished runs are kept in the shared result
cache (result_cache.py). The verdict is coord_verdict.py's.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..engine.hparams import HParams
from ..engine.outputs import OutputError, select
from ..engine.plan import MUP, SP
from ..engine.spectral import OPTIMIZERS
from ..errors import UserError
from . import experiment
from .coord_attention import AttentionTracer
from .coord_spectral import SpectralRecorder
from .recipe import Recipe
from .result_cache import ResultCache
from .result_cache import cache_key as _hash

ROOT = "<output>"          # name shown for the root module (the model's output)
PROBE_SEED = 0             # the probe batch: first batch of the validation stream at this seed
MEASUREMENTS = 3           # v3: the update's spectral ratio in feature space, on every seed


# ----------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    widths: tuple[int, ...]
    steps: int
    seeds: int
    lr: float
    optimizer: str
    parametrization: str
    batch_size: int
    device: str = "cpu"
    # coord-check --depths: `widths` holds depths, every model has this width; "sp" = no depth rule
    depth_width: Optional[int] = None

    @property
    def axis(self) -> str:
        return "depth" if self.depth_width else "width"


def default_widths(proxy: int, n: int = 4) -> list[int]:
    """A doubling ladder of n widths around the proxy: proxy/2, proxy, 2 proxy, 4 proxy (the proxy
    itself when it is odd or 1)."""
    start = proxy // 2 if proxy % 2 == 0 and proxy >= 2 else proxy
    return [start * 2**i for i in range(n)]


def parse_widths(text: str, where: str = "--widths") -> list[int]:
    try:
        ws = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(where, f"{text!r} is not a comma-separated list of integers") from None
    return check_widths(ws, where)


def check_widths(ws: list[int], where: str) -> list[int]:
    if any(w <= 0 for w in ws):
        raise UserError(where, "widths must be > 0")
    ws = sorted(set(ws))
    if len(ws) < 2:
        raise UserError(where, "needs at least 2 different widths (4 or more recommended)")
    return ws


def resolve(recipe: Recipe, widths: Optional[list[int]] = None, steps: Optional[int] = None,
            seeds: Optional[int] = None, lr: Optional[float] = None, optimizer: Optional[str] = None,
            parametrization: str = MUP, device: str = "cpu") -> Settings:
    """Flags, then the recipe's coord_check section, then defaults (README)."""
    cc = recipe.coord_check
    ws = check_widths(list(widths), "--widths") if widths is not None else (
        check_widths(list(cc.widths), "coord_check.widths") if cc.widths else default_widths(recipe.widths.proxy))
    steps = cc.steps if steps is None else steps
    if steps < 1:
        raise UserError("--steps", "must be >= 1")
    seeds = cc.seeds if seeds is None else seeds
    if seeds < 1:
        raise UserError("--seeds", "must be >= 1")
    lr = lr if lr is not None else (cc.lr if cc.lr is not None else recipe.train.lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError("--lr", "must be a finite number > 0")
    optimizer = optimizer or recipe.train.optimizer
    if optimizer not in OPTIMIZERS and optimizer != recipe.train.optimizer:    # or the recipe's named class
        raise UserError("--optimizer", f"unknown optimizer {optimizer!r}; expected {' | '.join(OPTIMIZERS)}")
    if parametrization not in (MUP, SP):
        raise UserError("--parametrization", f"unknown {parametrization!r}; expected mup | sp")
    bs = cc.batch_size or recipe.train.batch_size
    return Settings(tuple(ws), steps, seeds, float(lr), optimizer, parametrization, bs, device)


# -------------------------------------------------------------------------------------- measurement

def _first_float(out):
    """The tensor a module returns (the first floating tensor of a tuple/list/dict), or None."""
    if torch.is_tensor(out):
        return out if out.is_floating_point() else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_float(o)
            if t is not None:
                return t
    return None


class Probe:
    """Forward hooks on every module, attached only while the fixed probe batch runs.

    The first call keeps each output as x_0; every call returns {module: (act, update)} as floats.
    A module called several times in one forward pass is measured over all its calls."""

    def __init__(self, model: nn.Module, x: torch.Tensor, output=None):
        self.model, self.x, self.output = model, x, output
        self.names = {id(m): (n or ROOT) for n, m in model.named_modules()}
        self.x0: dict[str, list[torch.Tensor]] = {}
        self._first = True
        self._sums: dict[str, list] = {}      # name -> [sum |x|, sum |x - x0|, numel, calls]
        self._seen: dict[tuple, tuple] = {}   # (id(x), version, id(x0)) -> sums: hook points, the root
        self._clones: dict[tuple, tuple] = {}  # (id(x), version) -> its copy, on the first call
        self._stack: list[str] = []            # names of the modules running (attention sites' names)
        self.static: dict[str, tuple[int, float]] = {}   # attention site -> (d_head, scale)
        self._attention = True   # off after a first pass that saw no attention (no overhead for MLPs)
        self.capture: set[str] = set()                 # modules whose input to keep (the spectral check's)
        self.inputs: dict[str, object] = {}            # their first input in the latest probe pass

    def _pre(self, module, args) -> None:
        name = self.names.get(id(module))
        if name is not None:
            self._stack.append(name)

    def _where(self) -> str:
        return self._stack[-1] if self._stack else ROOT

    def _hook(self, module, args, out) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        if self._stack and self._stack[-1] == name:
            self._stack.pop()
        if name in self.capture and name not in self.inputs:
            a = args[0] if args and torch.is_tensor(args[0]) else None
            self.inputs[name] = None if a is None else (a.detach(), a._version)   # the version: in-place ops later
        if module is self.model:
            try:
                out = select(out, self.output)
            except OutputError:
                return
        t = out if torch.is_tensor(out) and out.is_floating_point() else _first_float(out)
        if t is None:
            return
        acc = self._sums.get(name)
        if acc is None:
            acc = self._sums[name] = [0.0, 0.0, 0, 0]
        if self._first:   # a copy: a later in-place op (ReLU(inplace=True)) must not rewrite x_0
            ck = (id(t), t._version)
            if ck not in self._clones:        # one copy per tensor: hook points share their input's
                self._clones[ck] = (t.detach().clone(), t)
            self.x0.setdefault(name, []).append(self._clones[ck][0])
        refs = self.x0.get(name, ())
        call = acc[3]
        acc[3] += 1
        ref = refs[call] if call < len(refs) else None
        if ref is None or ref.shape != t.shape or acc[2] < 0:
            acc[2] = -1                       # the output changed shape or call count: not comparable
            return
        key = (id(t), t._version, id(ref))   # the version: in-place ops between two hooks
        hit = self._seen.get(key)
        if hit is None:
            t32, r32 = t.float(), ref.float()   # abs().sum() is ~3x faster than norm(p=1) on CPU
            hit = self._seen[key] = (t32.abs().sum(), (t32 - r32).abs().sum(), t.numel(), t, ref)
        acc[0] = acc[0] + hit[0]
        acc[1] = acc[1] + hit[1]
        acc[2] += hit[2]

    def _hook_site(self, site: str, t: torch.Tensor) -> None:
        """An attention site's logits, measured like a module output named `site`."""
        fake = _Site()
        self.names[id(fake)] = site
        self._hook(fake, (), t)

    @torch.no_grad()
    def __call__(self) -> dict[str, tuple[float, float]]:
        model = self.model
        was = model.training
        self._sums, self._seen, self._clones, self.inputs = {}, {}, {}, {}
        # one global forward hook for the duration of this forward pass (cheaper than one per module),
        # and the attention tracer (coord_attention.py): probe passes only, never training steps
        handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        pre = torch.nn.modules.module.register_module_forward_pre_hook(self._pre)
        devices = [self.x.device] if self.x.device.type == "cuda" else []
        tracer = AttentionTracer(self._where)
        self._stack = []
        try:
            model.eval()
            with torch.random.fork_rng(devices=devices), (tracer if self._attention else contextlib.nullcontext()):
                model(self.x)
        finally:
            handle.remove()
            pre.remove()
            model.train(was)
        for site, tensors in tracer.logits.items():
            for t in tensors:
                self._hook_site(site, t)
        if self._first:
            self.static = dict(tracer.static)
            self._attention = bool(tracer.logits or tracer.static)
        self._first = False
        names = [n for n, acc in self._sums.items() if acc[2] > 0 and acc[3] == len(self.x0.get(n, ()))]
        self._seen, self._clones = {}, {}
        if not names:
            return {}
        sums = torch.stack([torch.as_tensor(self._sums[n][i], dtype=torch.float32, device=self.x.device)
                            for i in (0, 1) for n in names])
        vals = sums.cpu().tolist()            # one device sync for every module
        k = len(names)
        return {n: (vals[i] / self._sums[n][2], vals[k + i] / self._sums[n][2]) for i, n in enumerate(names)}


class _Site:
    """Stands in for a module when an attention site's logits go through Probe._hook."""


class Recorder:
    """train() callback: probe at t = 0 (on_start) and after every optimizer step."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.records: list[dict[str, tuple[float, float]]] = []

    def on_start(self, state) -> None:
        self.records.append(self.probe())

    def on_step(self, state) -> None:
        self.records.append(self.probe())


@dataclass
class Run:
    width: int
    seed: int
    records: list[dict[str, tuple[float, float]]]   # index t = 0..steps (fewer if it diverged)
    diverged: bool = False
    reason: str = ""
    attention: dict = field(default_factory=dict)   # site -> (d_head, scale), from the first probe
    # parameter -> (||W_0|| / target, the update's ratio, its statistic: coord_spectral.FEATURE | OPERATOR)
    spectral: dict = field(default_factory=dict)


def probe_batch(recipe: Recipe, batch_size: int, device: str) -> torch.Tensor:
    """The fixed probe inputs: the first validation batch at PROBE_SEED (the same at every width)."""
    x, _ = experiment.first_batch(experiment.data_stream(recipe, "val", PROBE_SEED, batch_size), "data")
    return x.to(device)


def training_batches(recipe: Recipe, s: Settings, seed_index: int) -> list:
    """The first s.steps training batches of seed `seed_index`, drawn once and reused at every width
    (the data then cannot differ between widths, and the stream is not re-read per width)."""
    it = experiment.data_stream(recipe, "train", recipe.train.seed + seed_index, s.batch_size)
    return [experiment.first_batch(it, "data") for _ in range(s.steps)]


def measure_model(model: nn.Module, plan, x: torch.Tensor, output, width: int, seed_index: int,
                  fit: Callable[[list], tuple[bool, str]]) -> Run:
    """One model: `fit(callbacks)` trains it (through train.train(), or a user's steps) calling the
    probe's and the spectral recorder's callbacks, and returns (diverged, reason)."""
    rec = Recorder(Probe(model, x, output))
    spec = SpectralRecorder(model, plan, x, rec.probe)
    diverged, reason = fit([rec, spec])
    return Run(width, seed_index, rec.records, diverged, reason, dict(rec.probe.static), dict(spec.values))


def user_steps(model: nn.Module, opt, batches, steps: int, train_step: Callable) -> Callable:
    """`fit` for a user's own step function: train_step(model, optimizer, batch) once per step."""
    def fit(callbacks: list) -> tuple[bool, str]:
        for cb in callbacks:
            cb.on_start(None)
        model.train()
        for _ in range(steps):
            train_step(model, opt, next(batches))
            for cb in callbacks:
                getattr(cb, "on_step", lambda s: None)(None)
        for cb in callbacks:
            getattr(cb, "on_end", lambda s: None)(None)
        return False, ""
    return fit


def loop_steps(model: nn.Module, opt, data, cfg) -> Callable:
    """`fit` through the one training loop (train.train)."""
    def fit(callbacks: list) -> tuple[bool, str]:
        from .train import train  # the one training loop

        state = train(model, opt, data, cfg, callbacks=callbacks)
        return state.diverged, state.reason
    return fit


def measure_one(recipe: Recipe, s: Settings, width: int, seed_index: int, x: torch.Tensor,
                batches: Optional[list] = None) -> Run:
    """Build the model at `width`, train it s.steps steps through train.train(), probing each step."""
    seed = recipe.train.seed + seed_index
    hp = HParams.from_train(recipe.train).with_values({"lr": s.lr})
    if s.depth_width:      # a depth ladder: `width` is the depth
        rd = experiment.at_depth(recipe, width)
        model, opt, plan = experiment.build(rd, s.depth_width, hp, device=s.device, seed=seed, optimizer=s.optimizer,
                                            depth_rule_on=s.parametrization == MUP)
    else:
        model, opt, plan = experiment.build(recipe, width, hp, device=s.device, seed=seed,
                                            parametrization=s.parametrization, optimizer=s.optimizer)
    cfg = experiment.train_config(recipe, s.device, steps=s.steps, schedule="constant", warmup=0,
                                  grad_clip=None, grad_accum=1, eval_every=0, log_every=s.steps)
    data = iter(batches) if batches is not None else experiment.data_stream(recipe, "train", seed, s.batch_size)
    try:
        run_ = measure_model(model, plan, x, recipe.model.output, width, seed_index,
                             loop_steps(model, opt, data, cfg))
    except UserError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise UserError("model", f"training failed at width {width}: {type(e).__name__}: {e}") from None
    if s.depth_width:
        run_ = relative_depth(run_, model, width, min(s.widths))
    return run_


def relative_depth(r: Run, model: nn.Module, depth: int, base: int) -> Run:
    """A depth ladder compares blocks at the same *relative* depth: at depth L, block i of a container
    of L blocks is kept when (i + 1) * base / L is whole and renamed to that index; other blocks are
    dropped. (At a fixed index the stream moves less as L grows: each block carries 1/L of the change.)"""
    containers = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == depth and n]

    def rename(name: str, internals: bool = False) -> Optional[str]:
        for c in containers:
            if name.startswith(c + "."):
                head, _, rest = name[len(c) + 1:].partition(".")
                rest = rest.partition(":")
                if not head.isdigit():
                    return name
                i = int(head)
                if ((i + 1) * base) % depth or (rest[0] and not internals):
                    return None     # inside a block the input sits at i/L, not (i+1)/L: compare block outputs
                j = (i + 1) * base // depth - 1
                new = f"{c}.{j}" + (f".{rest[0]}" if rest[0] else "") + (rest[1] + rest[2] if rest[1] else "")
                return new
        return name

    recs = [{k: v for k, v in ((rename(n), v) for n, v in rec.items()) if k is not None} for rec in r.records]
    spec = {k: v for k, v in ((rename(n, True), v) for n, v in r.spectral.items()) if k is not None}
    att = {k: v for k, v in ((rename(n, True), v) for n, v in r.attention.items()) if k is not None}
    return Run(r.width, r.seed, recs, r.diverged, r.reason, att, spec)


def measure(recipe: Recipe, s: Settings, on_run: Optional[Callable[[int, int], None]] = None,
            cache_dir: Optional[Path] = None) -> list[Run]:
    """Every (width, seed) in turn, one model in memory at a time. on_run(width, seed) after each.
    With cache_dir, each finished run is saved there and runs already saved (same recipe and
    settings) are loaded instead of trained: an interrupted check resumes where it stopped."""
    cache = ResultCache(cache_dir, cache_key(recipe, s)) if cache_dir is not None else None
    x = data = None
    runs = []
    for w in s.widths:
        for k in range(s.seeds):
            run_ = load_run(cache, w, k) if cache is not None else None
            if run_ is None:
                if x is None:
                    x = probe_batch(recipe, s.batch_size, s.device)
                    data = {j: training_batches(recipe, s, j) for j in range(s.seeds)}
                run_ = measure_one(recipe, s, w, k, x, data[k])   # the model is freed on return
                if cache is not None:
                    save_run(cache, run_)
                if s.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            runs.append(run_)
            if on_run:
                on_run(w, k)
    return runs


# ------------------------------------------------------------------------------------------- resume

def cache_key(recipe: Recipe, s: Settings) -> str:
    """Everything a run's numbers depend on: the recipe (minus its name and coord_check section,
    which only feed the settings) and the settings, device excluded (result_cache.py's key scheme)."""
    d = recipe.model_dump(mode="json", exclude={"name", "coord_check", "search", "sweep"})
    d["settings"] = {k: v for k, v in asdict(s).items() if k != "device"}
    d["probe_seed"] = PROBE_SEED
    d["measurements"] = MEASUREMENTS
    return _hash(d)


def _run_name(width: int, seed: int) -> str:
    return f"w{width}-s{seed}.json"


def _num(x: float):
    return x if math.isfinite(x) else repr(x)      # strict JSON: inf, -inf, nan as strings


def save_run(cache: ResultCache, r: Run) -> None:
    cache.save(_run_name(r.width, r.seed),
               {"width": r.width, "seed": r.seed, "diverged": r.diverged, "reason": r.reason,
                "records": [{n: [_num(v[0]), _num(v[1])] for n, v in rec.items()} for rec in r.records],
                "attention": {n: [int(v[0]), _num(v[1])] for n, v in r.attention.items()},
                "spectral": {n: [_num(v[0]), _num(v[1]), v[2]] for n, v in r.spectral.items()}})


def load_run(cache: ResultCache, width: int, seed: int) -> Optional[Run]:
    """A saved run, or None when there is none or it cannot be trusted (it is then measured again)."""
    d = cache.load(_run_name(width, seed))
    if d is None:
        return None
    try:
        records = [{n: (float(v[0]), float(v[1])) for n, v in rec.items()} for rec in d["records"]]
        att = {n: (int(v[0]), float(v[1])) for n, v in d.get("attention", {}).items()}
        spec = {n: (float(v[0]), float(v[1]), str(v[2])) for n, v in d.get("spectral", {}).items()}
        run_ = Run(int(d["width"]), int(d["seed"]), records, bool(d["diverged"]), str(d["reason"]), att, spec)
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return run_ if (run_.width, run_.seed) == (width, seed) else None
