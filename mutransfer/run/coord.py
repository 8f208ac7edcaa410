"""Coordinate check: train the recipe's model a few steps at several widths and decide whether the
per-coordinate size of every module's output, and of its change since initialisation, stays put.

Measurement: forward hooks on every module (the root module, i.e. the model's output, and identity
"hook point" modules included) record, on one fixed probe batch at t = 0..N optimizer steps,
    act     mean |x_t|          the size of the output's coordinates,
    update  mean |x_t - x_0|    the size of their change since initialisation
(Desideratum 1 of the spectral paper: both Theta(1) in width). Training goes through train.train();
the probe runs from a callback, under torch.no_grad, in eval mode and with the RNG state forked, and
its hooks exist only while it runs, so it cannot change the training.

Verdict (pure functions below): for each module and statistic, the least-squares slope of
log(value at the last step, averaged over seeds) against log(width). A slope above BLOWUP_SLOPE is
"blowup" (exit 1); an update slope below VANISH_SLOPE is "vanishing" (a warning: kernel-like updates).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..atomic import write_json
from . import experiment
from ..errors import UserError
from ..outputs_guard import marker
from .coord_attention import AttentionTracer, scale_finding
from .coord_spectral import SpectralRecorder
from ..engine.hparams import HParams
from ..engine.outputs import OutputError, select
from ..engine.plan import MUP, SP
from .recipe import Recipe
from ..engine.spectral import OPTIMIZERS

STATS = ("act", "update")
# Thresholds on the log-log slope (value ~ width^slope), chosen from measurements (docs/coord-check.md):
# the steepest slope of a correct muP model was +0.21 (most <= +0.10); the mildest defect measured
# (1/sqrt(d_head) attention, at 10x the tuned LR) +0.36 to +0.47; SP under AdamW +0.68.
BLOWUP_SLOPE = 0.3
VANISH_SLOPE = -0.3
# the spectral check (coord_spectral.py) divides each norm by what the condition prescribes, so a
# correct parameter's slope is ~0 in either direction; |slope| above this is "mis-scaled" (exit 1).
SPECTRAL_SLOPE = 0.3
TAIL = 3                   # growth must persist over the widest TAIL widths to count (transients)
FAILING = ("blowup", "mis-scaled")
SPECTRAL_STATS = ("‖W₀‖", "‖ΔW‖")
ROOT = "<output>"          # name shown for the root module (the model's output)
PROBE_SEED = 0             # the probe batch: first batch of the validation stream at this seed
TINY = 1e-30               # values at or below this count as exactly zero


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
    """Flags, then the recipe's coord_check section, then defaults (docs/commands.md, coord-check)."""
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
    if optimizer not in OPTIMIZERS:
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
        self._sums, self._seen, self._clones = {}, {}, {}
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
    spectral: dict = field(default_factory=dict)    # parameter -> (||W_0|| / target, ||dW|| / target)


def probe_batch(recipe: Recipe, batch_size: int, device: str) -> torch.Tensor:
    """The fixed probe inputs: the first validation batch at PROBE_SEED (the same at every width)."""
    x, _ = experiment.first_batch(experiment.data_stream(recipe, "val", PROBE_SEED, batch_size), "data")
    return x.to(device)


def training_batches(recipe: Recipe, s: Settings, seed_index: int) -> list:
    """The first s.steps training batches of seed `seed_index`, drawn once and reused at every width
    (the data then cannot differ between widths, and the stream is not re-read per width)."""
    it = experiment.data_stream(recipe, "train", recipe.train.seed + seed_index, s.batch_size)
    return [experiment.first_batch(it, "data") for _ in range(s.steps)]


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
    rec = Recorder(Probe(model, x, recipe.model.output))
    spec = SpectralRecorder(model, plan) if seed_index == 0 else None   # one seed: norms are not noisy
    data = iter(batches) if batches is not None else experiment.data_stream(recipe, "train", seed, s.batch_size)
    from .train import train  # the one training loop

    try:
        state = train(model, opt, data, cfg, callbacks=[rec] + ([spec] if spec else []))
    except UserError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise UserError("model", f"training failed at width {width}: {type(e).__name__}: {e}") from None
    run_ = Run(width, seed_index, rec.records, state.diverged, state.reason, dict(rec.probe.static),
               dict(spec.values) if spec else {})
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
    cache = cache_dir / cache_key(recipe, s) if cache_dir is not None else None
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
    which only feed the settings) and the settings, device excluded."""
    d = recipe.model_dump(mode="json", exclude={"name", "coord_check", "search", "sweep"})
    d["settings"] = {k: v for k, v in asdict(s).items() if k != "device"}
    d["probe_seed"] = PROBE_SEED
    d["measurements"] = 2     # v2: attention logits, spectral norms
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _run_path(cache: Path, width: int, seed: int) -> Path:
    return cache / f"w{width}-s{seed}.json"


def save_run(cache: Path, r: Run) -> None:
    write_json(_run_path(cache, r.width, r.seed),
               {"width": r.width, "seed": r.seed, "diverged": r.diverged, "reason": r.reason,
                "records": [{n: list(v) for n, v in rec.items()} for rec in r.records],
                "attention": {n: list(v) for n, v in r.attention.items()},
                "spectral": {n: list(v) for n, v in r.spectral.items()}}, indent=None)


def load_run(cache: Path, width: int, seed: int) -> Optional[Run]:
    """A saved run, or None when there is none or it cannot be read (it is then measured again)."""
    path = _run_path(cache, width, seed)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        records = [{n: (float(v[0]), float(v[1])) for n, v in rec.items()} for rec in d["records"]]
        att = {n: (int(v[0]), float(v[1])) for n, v in d.get("attention", {}).items()}
        spec = {n: (float(v[0]), float(v[1])) for n, v in d.get("spectral", {}).items()}
        return Run(int(d["width"]), int(d["seed"]), records, bool(d["diverged"]), str(d["reason"]), att, spec)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


# ------------------------------------------------------------------------------------------ verdict

def loglog_slope(widths: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width). Values that are all ~0 give 0 (nothing
    to scale); a non-finite value gives +inf (it blew up); a zero among non-zeros gives -inf."""
    if any(not math.isfinite(v) for v in values):
        return math.inf
    if all(abs(v) <= TINY for v in values):
        return 0.0
    if any(abs(v) <= TINY for v in values):
        return -math.inf
    xs = [math.log(w) for w in widths]
    ys = [math.log(abs(v)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx


def flag(statistic: str, slope: float, blowup: float = BLOWUP_SLOPE, vanish: float = VANISH_SLOPE) -> str:
    """The flag of one slope: blowup above the threshold, vanishing for update slopes below the
    (negative) one, else ok."""
    if slope > blowup:
        return "blowup"
    if statistic == "update" and slope < vanish:
        return "vanishing"
    return "ok"


@dataclass
class Row:
    name: str
    statistic: str
    values: list[float]          # per width, seed-averaged, at the last step
    slope: float
    spread: float                # std of the per-seed slopes
    flag: str
    series: list[list[float]] = field(default_factory=list)  # per width, seed-averaged, t = 0..steps
    tail_slope: Optional[float] = None   # over the widest TAIL widths (None with fewer widths)
    early_slope: Optional[float] = None  # updates: the slope after the first step (before saturation)


def judged(widths: list[int], values: list[float], statistic: str, start: int = 0,
           name_is_logits: bool = False) -> tuple[float, Optional[float], str]:
    """(slope, tail slope, flag) of one series. Slopes are fitted from index `start` (past a regime
    change of the rule); growth is a blowup only when the slope over the widest TAIL widths is above
    the threshold too: a finite-width transient that stops growing is not one. Spectral statistics
    are flagged "mis-scaled" in either direction."""
    ws, vs = widths[start:], values[start:]
    if len(ws) < 2:
        ws, vs = widths, values
    slope = loglog_slope(ws, vs)
    tail = loglog_slope(ws[-TAIL:], vs[-TAIL:]) if len(ws) > TAIL else None
    if statistic in SPECTRAL_STATS:
        bad = abs(slope) > SPECTRAL_SLOPE and (tail is None or abs(tail) > SPECTRAL_SLOPE)
        return slope, tail, ("mis-scaled" if bad else "ok")
    f = flag(statistic, slope)
    if f == "vanishing" and name_is_logits:
        f = "ok"      # 1/d logits start O(1/sqrt(d)) and move slowly: shrinking is expected early
    if f == "blowup" and tail is not None and flag(statistic, tail) != "blowup":
        f = "ok"
    return slope, tail, f


def regime_start(changes: list[tuple[str, int, int]], widths: list[int]) -> int:
    """Index of the first width past the last regime change (0 when there is none)."""
    idx = 0
    for _, _, w_b in changes:
        if w_b in widths:
            idx = max(idx, widths.index(w_b))
    return idx if len(widths) - idx >= 2 else 0


def regime_changes(recipe: Recipe, widths: list[int]) -> list[tuple[str, int, int]]:
    """(parameter, width a, width b): the rule's min(1, sqrt(fan_out/fan_in)) changes branch
    between consecutive widths a and b (e.g. a stem conv with fan_in 27 at channels 16 -> 32)."""
    out = []
    branch: dict[str, list[tuple[int, bool]]] = {}
    for w in widths:
        for n, p in experiment.shapes_for(recipe, w).params.items():
            if p.role in ("input", "hidden", "output"):
                branch.setdefault(n, []).append((w, p.fan_out >= p.fan_in))
    for n, seq in branch.items():
        for (wa, ba), (wb, bb) in zip(seq, seq[1:]):
            if ba != bb:
                out.append((n, wa, wb))
    return out


@dataclass
class Result:
    settings: Settings
    rows: list[Row]
    diverged: list[str]
    findings: list[str] = field(default_factory=list)   # structural: wrong attention scale
    notes: list[str] = field(default_factory=list)      # regime changes of the rule inside the ladder

    @property
    def verdict(self) -> str:
        bad = self.diverged or self.findings or any(r.flag in FAILING for r in self.rows)
        return "blowup" if bad else "ok"

    def to_json(self) -> dict:
        return to_json(self)

    @property
    def worst_first(self) -> list[Row]:
        return sorted(self.rows, key=lambda r: (-_finite_key(r.slope), r.name, r.statistic))


def to_json(res: Result) -> dict:
    """The result as plain JSON data (what --json writes; infinities as strings, NaN as null)."""
    s = res.settings

    def num(x: float):
        return x if math.isfinite(x) else (None if x != x else ("inf" if x > 0 else "-inf"))

    return {
        "written_by": marker("coord-check results"),
        "verdict": res.verdict,
        "parametrization": s.parametrization,
        "optimizer": s.optimizer,
        "lr": s.lr,
        "widths": list(s.widths),
        "steps": s.steps,
        "seeds": s.seeds,
        "thresholds": {"blowup": BLOWUP_SLOPE, "vanishing": VANISH_SLOPE, "spectral": SPECTRAL_SLOPE,
                       "tail_widths": TAIL},
        "diverged": list(res.diverged),
        "findings": list(res.findings),
        "notes": list(res.notes),
        "modules": [
            {"name": r.name, "statistic": r.statistic, "values": [num(v) for v in r.values],
             "slope": num(r.slope), "tail_slope": None if r.tail_slope is None else num(r.tail_slope),
             "spread": num(r.spread), "flag": r.flag,
             "series": [[num(v) for v in ser] for ser in r.series]}
            for r in res.worst_first
        ],
    }


def _finite_key(x: float) -> float:
    return 1e300 if x == math.inf else (-1e300 if x == -math.inf else x)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else math.nan


def verdict(runs: list[Run], s: Settings, changes: Optional[list[tuple[str, int, int]]] = None) -> Result:
    """Rows (module x statistic, parameter x spectral statistic) with slopes and flags, structural
    findings on attention scales, from the measured runs. `changes`: regime_changes of the rule."""
    widths = list(s.widths)
    changes = changes or []
    start = regime_start(changes, widths)
    notes = [f"{n}: the rule's min(1, √(fan_out/fan_in)) changes branch between widths {a} and {b}; "
             f"slopes are judged from width {widths[start]} on" for n, a, b in changes if start and b == widths[start]]
    names: list[str] = []
    for r in runs:
        for rec in r.records:
            for n in rec:
                if n not in names:
                    names.append(n)
    diverged = [f"width {r.width} seed {r.seed}: {r.reason}" for r in runs if r.diverged]
    T = s.steps
    rows = []
    for name in names:
        for si, stat in enumerate(STATS):
            # value[w][seed][t]; NaN where missing, +inf where the run diverged before t
            def at(r: Run, t: int) -> float:
                if t < len(r.records):
                    v = r.records[t].get(name)
                    return v[si] if v is not None else math.nan
                return math.inf if r.diverged else math.nan
            per_w = {w: [rr for rr in runs if rr.width == w] for w in widths}
            series = [[_mean([at(rr, t) for rr in per_w[w]]) for t in range(T + 1)] for w in widths]
            last = [ser[T] for ser in series]
            present = [(w, v) for w, v in zip(widths, last) if v == v]
            if len(present) < 2 or (s.depth_width and len(present) < len(widths)):
                continue        # a depth ladder judges the modules every depth has (the first blocks, the rest)
            pw = [w for w, _ in present]
            slope, tail, fl = judged(pw, [v for _, v in present], stat,
                                     start=pw.index(widths[start]) if widths[start] in pw else 0,
                                     name_is_logits=name.endswith(":attn-logits"))
            seeds = sorted({rr.seed for rr in runs})
            per_seed = []
            for k in seeds:
                pts = [(w, at(rr, T)) for w in widths for rr in per_w[w] if rr.seed == k]
                pts = [(w, v) for w, v in pts if v == v]
                if len(pts) >= 2:
                    per_seed.append(loglog_slope([w for w, _ in pts], [v for _, v in pts]))
            fin = [p for p in per_seed if math.isfinite(p)]
            spread = math.sqrt(sum((p - _mean(fin)) ** 2 for p in fin) / len(fin)) if len(fin) > 1 else 0.0
            early = None
            if stat == "update" and T >= 2:
                first = [(w, ser[1]) for w, ser in zip(widths, series) if ser[1] == ser[1]]
                if len(first) >= 2:
                    fw = [w for w, _ in first]
                    early, _, efl = judged(fw, [v for _, v in first], stat,
                                           start=fw.index(widths[start]) if widths[start] in fw else 0,
                                           name_is_logits=name.endswith(":attn-logits"))
                    if efl == "blowup":
                        fl = "blowup"   # growth right after the first step: a trend, not saturation
            rows.append(Row(name, stat, last, slope, spread, fl, series, tail, early))
    # the spectral condition, per parameter (seed 0's runs)
    spec_runs = {r.width: r for r in runs if r.spectral and not r.diverged}
    params = sorted({n for r in spec_runs.values() for n in r.spectral})
    for n in params:
        for si, stat in enumerate(SPECTRAL_STATS):
            pts = [(w, spec_runs[w].spectral[n][si]) for w in widths if w in spec_runs and n in spec_runs[w].spectral]
            if s.depth_width and len(pts) < len(widths):
                continue
            if len(pts) < 2 or (si == 0 and all(v <= TINY for _, v in pts)):
                continue        # a zero-initialised matrix is judged on its update only
            pw = [w for w, _ in pts]
            # a parameter's norm is judged past its *own* regime change only (others' do not move it)
            own = regime_start([c for c in changes if c[0] == n], pw)
            slope, tail, fl = judged(pw, [v for _, v in pts], stat, start=own)
            rows.append(Row(n, stat, [v for _, v in pts], slope, 0.0, fl, [], tail))
    # attention scales, structurally
    findings = []
    sites = sorted({n for r in runs for n in r.attention})
    for site in sites:
        per_width = {}
        for r in runs:
            if site in r.attention:
                per_width.setdefault(r.width, tuple(r.attention[site]))
        f = scale_finding(site, per_width)
        if f:
            findings.append(f)
    return Result(s, rows, diverged, findings, notes)


def run(recipe: Recipe, s: Settings, on_run: Optional[Callable[[int, int], None]] = None,
        cache_dir: Optional[Path] = None) -> Result:
    changes = [] if s.depth_width else regime_changes(recipe, list(s.widths))
    return verdict(measure(recipe, s, on_run, cache_dir), s, changes)
