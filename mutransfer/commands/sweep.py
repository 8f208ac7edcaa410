"""`mutransfer sweep`: the loss against the learning rate (or another tunable) at several widths, under
muP and under the SP control. Under muP the optimum should stay put as the width grows; under SP it drifts.

Each grid point (parametrization, width, value, seed) is one short run through experiment.build() and
train.train(). Its loss is the training loss averaged over the last `average_last` steps (as in TP5,
which plots training loss; the built-in streams draw fresh random batches, so the training loss is
not a memorised-batch loss). A point is cached as one JSON file under runs/<name>/sweep/<fingerprint>/
(the fingerprint hashes everything else that changes the result; run/result_cache.py: one key scheme and integrity check with coord-check), written atomically when it finishes, so an interrupted or repeated sweep skips what is done. A diverged point
(a non-finite loss, or a loss above `divergence_factor` x its first) is kept with a null loss.
"""
from __future__ import annotations

import math
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional

from ..atomic import write_json
from ..console import PlainLines, literal, make_console, progress_bar
from ..engine.hparams import SWEEPABLE
from ..errors import UserError
from ..flags import at_least, warmup_problem
from ..outputs_guard import check_output as guard
from ..outputs_guard import marker
from ..report.loggers import Loggers, check_kinds
from ..report.sweep_fit import (
    TRANSFER_EXIT,
    Optimum,
    drift,
    mean_or_none,
    optimum,
    shared_index,
    transfer,
    transfer_line,
    wider_is_better,
)
from ..run.recipe import Recipe, recipe_to_dict
from ..run.result_cache import ResultCache, cache_key
from ..signals import available_cpus
from ..threads import choose as threads_choose

PARAMETRIZATIONS = ("mup", "sp")
# tunables a sweep can vary: positive numbers, so a log2 axis makes sense
LABEL = {"mup": "μP", "sp": "SP"}
# what the two arms are called on each axis: the rule under test, and the control without it
ARMS = {"width": LABEL, "depth": {"mup": "depth rule", "sp": "no depth rule"},
        "horizon": {"mup": "horizon rule", "sp": "no horizon rule"},
        "batch": {"mup": "batch rule", "sp": "no batch rule"}}
# the name of the "bigger is better" check along each axis (summary JSON key)
BETTER = {"width": "wider_is_better", "depth": "deeper_is_better", "horizon": "longer_is_better",
          "batch": "larger_batch_is_better"}
# equal samples: a bigger batch may cost a little (past the critical batch it must); "not worse" allows this
EQUAL_SAMPLES_TOL = 0.005


def arm(cfg: "SweepConfig", par: str) -> str:
    return ARMS[cfg.axis][par]


@dataclass(frozen=True)
class Point:
    parametrization: str
    width: int
    value: float
    seed: int

    def filename(self, param: str) -> str:
        # the value's full precision (repr is exact): LRs closer than 6 digits must not share a file
        return f"{self.parametrization}-w{self.width}-{param}{float(self.value)!r}-s{self.seed}.json"


@dataclass(frozen=True)
class SweepConfig:
    param: str
    values: tuple[float, ...]
    widths: tuple[int, ...]
    parametrizations: tuple[str, ...]
    seeds: int
    steps: int
    batch_size: int
    average_last: int
    divergence_factor: float
    # depth sweep (`--depths`): `widths` holds the depths and every model has this width; "mup" is the
    # depth rule, "sp" the same model with every depth multiplier 1 (the width rule stays)
    depth_width: Optional[int] = None
    # horizon sweep (`--horizons`): `widths` holds the steps; batch sweep (`--batch-sizes`): the batch
    # sizes, at equal steps or equal samples (`equal`). Every model has `fixed_width`; "mup" is the
    # horizon and batch rule (engine/horizon.py), "sp" the proxy's settings kept (no rule)
    along: Optional[str] = None          # "horizon" | "batch"
    fixed_width: Optional[int] = None
    equal: str = "steps"                 # batch sweeps: "steps" or "samples" (steps x batch fixed)
    # exponents `tune` measured (hparams file `horizon:` section) as sorted (key, value) pairs
    measured: tuple = ()

    @property
    def axis(self) -> str:
        return "depth" if self.depth_width else (self.along or "width")

    @property
    def reference(self) -> Optional[int]:
        """The axis value at which both arms are the same model: the proxy's (None for width/depth)."""
        return None if self.along is None else (self.steps if self.along == "horizon" else self.batch_size)

    def run_of(self, value: int) -> tuple[int, int]:
        """(steps, batch) of a point at axis value `value`."""
        if self.along == "horizon":
            return value, self.batch_size
        if self.along == "batch":
            steps = self.steps if self.equal == "steps" else max(1, round(self.steps * self.batch_size / value))
            return steps, value
        return self.steps, self.batch_size

    def last_of(self, value: int) -> int:
        """Steps averaged for a point's loss: average_last, or 10% of a horizon/batch point's own run."""
        steps = self.run_of(value)[0]
        return min(steps, self.average_last if self.along is None else max(5, steps // 10))

    def points(self) -> list[Point]:
        return [Point(p, w, v, s) for p in self.parametrizations for w in self.widths
                for v in self.values for s in range(self.seeds)]


# ----------------------------------------------------------------------------------------------- input

def parse_list(text: str, flag: str, kind=float) -> list:
    try:
        vals = [kind(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(flag, f"expected comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}") from None
    if not vals:
        raise UserError(flag, "is empty")
    return vals


def parse_range(text: str, flag: str = "--lr-range") -> list[float]:
    """'LOW:HIGH:POINTS' -> POINTS values log-spaced from LOW to HIGH inclusive."""
    parts = text.split(":")
    if len(parts) != 3:
        raise UserError(flag, f"expected LOW:HIGH:POINTS (e.g. 1e-4:1e-1:8), got {text!r}")
    try:
        lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise UserError(flag, f"expected LOW:HIGH:POINTS (e.g. 1e-4:1e-1:8), got {text!r}") from None
    if not 0 < lo < hi or not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError(flag, f"needs 0 < LOW < HIGH, got {lo:g}:{hi:g}")
    if n < 2:
        raise UserError(flag, "needs at least 2 points")
    a, b = math.log2(lo), math.log2(hi)
    return [2 ** (a + (b - a) * i / (n - 1)) for i in range(n)]


def default_widths(proxy: int, target: int) -> list[int]:
    """proxy, 2 proxy, 4 proxy, ... up to target (target always included)."""
    ws, w = [], proxy
    while w < target:
        ws.append(w)
        w *= 2
    return ws + [target]


def default_values(center: float, octaves: int = 5) -> list[float]:
    """One value per octave from center / 2^octaves to center x 2^octaves."""
    return [center * 2.0 ** k for k in range(-octaves, octaves + 1)]


def make_config(recipe: Recipe, widths: Optional[list[int]] = None, values: Optional[list[float]] = None,
                param: Optional[str] = None, parametrization: Optional[str] = None, seeds: Optional[int] = None,
                steps: Optional[int] = None, batch_size: Optional[int] = None, depths: Optional[list[int]] = None,
                width: Optional[int] = None, horizons: Optional[list[int]] = None,
                batch_sizes: Optional[list[int]] = None, equal: Optional[str] = None) -> SweepConfig:
    """Flags over the recipe's `sweep:` section over defaults; every value checked (UserError).
    With `depths`, the sweep runs over depths at the fixed `width` (default widths.proxy)."""
    s = recipe.sweep
    if horizons is not None or batch_sizes is not None:
        return _horizon_config(recipe, widths, values, param, parametrization, seeds, steps, batch_size, depths,
                               width, horizons, batch_sizes, equal)
    if depths is not None:
        if widths is not None:
            raise UserError("--depths", "give --depths or --widths, not both")
        if recipe.depths is None:
            raise UserError("--depths", "the recipe has no depths: section (the depth rule's alpha and the depth argument)")
        if any(d < 1 for d in depths):
            raise UserError("--depths", "depths must be >= 1")
        from ..run.experiment import at_depth
        for d in depths:
            at_depth(recipe, d, "--depths")         # the recipe's depth bound, before any block is built
        fixed = width if width is not None else recipe.widths.proxy
        at_least(fixed, 1, "--width")
        cfg = make_config(recipe, sorted(set(depths)), values, param, parametrization, seeds, steps, batch_size)
        return SweepConfig(**{**cfg.__dict__, "depth_width": fixed})
    if width is not None:
        raise UserError("--width", "applies to depth sweeps (--depths) only")
    param = param or s.param
    if param not in SWEEPABLE:
        raise UserError("--param", f"cannot sweep {param!r}; sweepable: {', '.join(SWEEPABLE)}")
    ws = widths or s.widths or default_widths(recipe.widths.proxy, recipe.widths.target)
    if any(w <= 0 for w in ws):
        raise UserError("--widths", "widths must be > 0")
    ws = sorted(set(int(w) for w in ws))
    if values is None:
        values = s.lrs if param == "lr" else s.values
    if values is None:
        from ..engine.hparams import HParams

        center = float(HParams.from_train(recipe.train).flat().get(param, 1.0))
        if not center > 0:
            raise UserError("--lrs", f"the recipe's {param} is {center:g}; give the values to sweep with --lrs")
        values = default_values(center)
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        raise UserError("--lrs", f"every {param} value must be a finite number > 0")
    values = sorted(set(float(v) for v in values))
    par = parametrization or s.parametrization
    if par not in ("mup", "sp", "both"):
        raise UserError("--parametrization", f"expected mup, sp or both, got {par!r}")
    pars = PARAMETRIZATIONS if par == "both" else (par,)
    seeds = seeds if seeds is not None else s.seeds
    if seeds < 1:
        raise UserError("--seeds", "must be >= 1")
    steps = steps if steps is not None else (s.steps or recipe.train.steps)
    if steps < 1:
        raise UserError("--steps", "must be >= 1")
    if warmup_problem(recipe.train.warmup, steps):
        raise UserError("--steps", warmup_problem(recipe.train.warmup, steps))
    bs = batch_size if batch_size is not None else (s.batch_size or recipe.train.batch_size)
    if bs < 1:
        raise UserError("--batch-size", "must be >= 1")
    last = s.average_last or max(1, min(steps, max(5, steps // 10)))
    last = min(last, steps)
    return SweepConfig(param, tuple(values), tuple(ws), pars, seeds, steps, bs, last, s.divergence_factor)


def _horizon_config(recipe: Recipe, widths, values, param, parametrization, seeds, steps, batch_size, depths,
                    width, horizons, batch_sizes, equal) -> SweepConfig:
    """--horizons (steps) or --batch-sizes at one width: the horizon and batch rule against none."""
    flag = "--horizons" if horizons is not None else "--batch-sizes"
    if horizons is not None and batch_sizes is not None:
        raise UserError("--batch-sizes", "give one axis: --horizons or --batch-sizes, not both")
    for other, name in ((widths, "--widths"), (depths, "--depths")):
        if other is not None:
            raise UserError(flag, f"give one axis: {flag} or {name}, not both")
    ladder = horizons if horizons is not None else batch_sizes
    if any(v < 1 for v in ladder):
        raise UserError(flag, f"values must be >= 1, got {','.join(map(str, ladder))}")
    if len(set(ladder)) < 2:
        raise UserError(flag, "needs at least 2 different values")
    eq = equal or "steps"
    if eq not in ("steps", "samples"):
        raise UserError("--equal", f"expected steps or samples, got {eq!r}")
    if equal is not None and batch_sizes is None:
        raise UserError("--equal", "applies to batch sweeps (--batch-sizes) only")
    fixed = width if width is not None else recipe.widths.proxy
    if fixed < 1:
        raise UserError("--width", f"must be >= 1, got {fixed}")
    base = make_config(recipe, [fixed], values, param, parametrization, seeds, steps, batch_size)
    cfg = SweepConfig(**{**base.__dict__, "widths": tuple(sorted(set(int(v) for v in ladder))),
                         "along": "horizon" if horizons is not None else "batch", "fixed_width": fixed, "equal": eq})
    for v in cfg.widths:
        st, _ = cfg.run_of(v)
        if recipe.train.warmup and st <= recipe.train.warmup and "sp" in cfg.parametrizations:
            raise UserError(flag, f"{v}: {st} steps do not exceed train.warmup ({recipe.train.warmup}), which the "
                                  "no-rule arm keeps")
    return cfg


def fingerprint(recipe: Recipe, cfg: SweepConfig) -> str:
    """Everything that changes a point's result besides the point itself."""
    d = recipe_to_dict(recipe)
    for k in ("name", "search", "coord_check", "sweep"):
        d.pop(k, None)
    d["widths"].pop("target", None)
    if d.get("target"):     # the target's own run and the measurement plan change no point's result
        for k in ("steps", "tokens_per_param", "count", "batch_size", "measure"):
            d["target"].pop(k, None)
    d["sweep_run"] = {"param": cfg.param, "steps": cfg.steps, "batch_size": cfg.batch_size,
                      "average_last": cfg.average_last, "divergence_factor": cfg.divergence_factor}
    if cfg.depth_width:
        d["sweep_run"]["depth_width"] = cfg.depth_width
    if cfg.along:
        d["sweep_run"].update({"along": cfg.along, "fixed_width": cfg.fixed_width, "equal": cfg.equal,
                               "measured": [list(m) for m in cfg.measured]})
        d["sweep_run"].pop("average_last")      # per point: 10% of its own run
    return cache_key(d)         # the one key scheme of coord-check and sweep (run/result_cache.py)


# ----------------------------------------------------------------------------------------------- running

class _Tail:
    """Callback keeping the last n training losses."""

    def __init__(self, n: int):
        self.losses: deque = deque(maxlen=n)

    def on_step(self, state) -> None:
        self.losses.append(state.loss)


class _Curve:
    """Callback: the training loss in `points` equal chunks of the run (chunk means): the curve's shape,
    which tells a run still in its initial descent (horizon_fit.is_early)."""

    def __init__(self, steps: int, points: int = 40):
        self.size = max(1, steps // points)
        self.means: list = []
        self._acc: list = []

    def on_step(self, state) -> None:
        self._acc.append(state.loss)
        if len(self._acc) == self.size:
            self.means.append(sum(self._acc) / self.size)
            self._acc = []


def run_point(recipe: Recipe, cfg: SweepConfig, point: Point, device: str = "cpu") -> dict:
    """Train one grid point through the shared loop and return its record (loss None if diverged)."""
    from ..engine.hparams import HParams
    from ..run.experiment import build, data_stream, train_config
    from ..run.train import train

    hp = HParams.from_train(recipe.train).with_values({cfg.param: point.value})
    seed = recipe.train.seed + point.seed
    t0 = time.perf_counter()
    steps, batch = cfg.run_of(point.width)
    over: dict[str, Any] = {}
    if cfg.depth_width:      # a depth sweep: point.width is the depth; "sp" turns the depth rule off
        from ..run.experiment import at_depth
        recipe = at_depth(recipe, point.width)
        pm = build(recipe, cfg.depth_width, hp, device=device, seed=seed, depth_rule_on=point.parametrization == "mup")
    elif cfg.along:          # a horizon / batch sweep: point.width is the steps / batch; "sp": no rule
        from ..run.experiment import horizon_factors
        hz = horizon_factors(recipe, steps, batch, cfg.steps, cfg.batch_size,
                             measured=dict(cfg.measured), rules_on=point.parametrization == "mup")
        pm = build(recipe, cfg.fixed_width, hp, device=device, seed=seed, horizon=hz)
        over["warmup"] = hz.warmup
    else:
        pm = build(recipe, point.width, hp, device=device, seed=seed, parametrization=point.parametrization)
    data = data_stream(recipe, "train", seed, batch_size=batch)
    last = cfg.last_of(point.width)
    tail, curve = _Tail(last), _Curve(steps)
    state = train(pm.model, pm.optimizer, data, train_config(recipe, device, steps=steps,
                  divergence_factor=cfg.divergence_factor, **over), callbacks=[tail, curve])
    vals = list(tail.losses)
    ok = not state.diverged and len(vals) == last and all(math.isfinite(v) for v in vals)
    return {
        "parametrization": point.parametrization, "width": point.width, "param": cfg.param,
        "value": point.value, "seed": point.seed,
        "loss": sum(vals) / len(vals) if ok else None,
        "diverged": not ok, "reason": state.reason if not ok else "",
        "first_loss": state.first_loss, "steps_done": state.step,
        "curve": [round(y, 5) if math.isfinite(y) else None for y in curve.means],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def measured_horizon(recipe: Recipe, runs_dir: Path) -> tuple:
    """The exponents `tune` measured for this recipe (runs/<name>/hparams.yaml `horizon:`), as sorted
    (key, value) pairs; () when there are none."""
    from ..run.hparams_file import default_path, read_hparams_file

    p = default_path(recipe.name, runs_dir)
    if not p.is_file():
        return ()
    h = read_hparams_file(p).get("horizon")
    if not isinstance(h, dict):
        return ()
    return tuple(sorted((k, float(v)) for k, v in h.items() if k in ("exponent", "batch_exponent")
                        and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)))


def write_json_atomic(path: Path, data: Any) -> None:
    write_json(path, data, allow_nan=False)


def load_cached(path: Path, fp: str) -> Optional[dict]:
    """A finished point's record, or None if absent, unreadable, altered or from a different setup."""
    d = ResultCache.in_folder(path.parent, fp).load(path.name)
    return d if d is not None and d.get("fingerprint") == fp else None


def store(path: Path, fp: str, rec: dict) -> None:
    """Save a finished point's record with the cache's key and checksum (run/result_cache.py)."""
    ResultCache.in_folder(path.parent, fp).save(path.name, rec)


def _run_and_store(recipe: Recipe, cfg: SweepConfig, point: Point, path: str, fp: str, device: str,
                   threads: int = 0) -> dict:
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        rec = run_point(recipe, cfg, point, device)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a point that crashes is reported, not cached (a rerun retries it)
        return {"parametrization": point.parametrization, "width": point.width, "param": cfg.param,
                "value": point.value, "seed": point.seed, "loss": None, "diverged": False,
                "error": f"{type(e).__name__}: {e}"}
    rec["fingerprint"] = fp
    store(Path(path), fp, rec)
    return rec


@contextmanager
def _sigterm_as_interrupt():
    """In the main thread, SIGTERM raises KeyboardInterrupt (so worker processes are stopped too)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:   # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_grid(recipe: Recipe, cfg: SweepConfig, cache_dir: Path, workers: int = 1, device: str = "cpu",
             progress: bool = True) -> dict[Point, dict]:
    """Every point's record: cached ones read back, the rest trained (largest widths first, so
    parallel workers finish together) and cached as they finish."""
    fp = fingerprint(recipe, cfg)
    cache_dir = Path(cache_dir) / fp   # one folder per setup: sweeps with other steps/batch keep theirs
    results: dict[Point, dict] = {}
    todo: list[Point] = []
    for p in cfg.points():
        rec = load_cached(cache_dir / p.filename(cfg.param), fp)
        if rec is not None and (rec.get("value") != p.value or rec.get("width") != p.width
                                or rec.get("seed") != p.seed):
            rec = None          # the cache must hold this very point, not a neighbour's
        if rec is not None:
            results[p] = rec
        else:
            todo.append(p)
    # the SP control is the very same model as muP at the proxy width: train it once, record it twice
    grid = set(cfg.points())
    same = cfg.reference if cfg.along else recipe.depths.proxy if cfg.depth_width else recipe.widths.proxy
    twins = {p: Point("mup", p.width, p.value, p.seed) for p in todo
             if p.parametrization == "sp" and p.width == same}
    twins = {p: t for p, t in twins.items() if t in grid}
    todo = [p for p in todo if p not in twins]
    todo.sort(key=lambda p: (-p.width, p.parametrization, p.value, p.seed))
    with progress_bar("sweep", disable=not progress) as bar:
        task = bar.add_task("", total=len(cfg.points()), completed=len(results))
        plain = PlainLines(bar.console, "sweep: points", len(cfg.points()), len(results)) if progress else None

        def done(p: Point, rec: dict) -> None:
            results[p] = rec
            loss = "failed" if rec.get("error") else "diverged" if rec["loss"] is None else f"{rec['loss']:.4f}"
            desc = f"{LABEL[p.parametrization]} {cfg.axis[0]}={p.width} {cfg.param}={p.value:.3g}: {loss}"
            bar.update(task, advance=1, description=desc)
            if plain is not None:
                plain.update(len(results), desc)

        if workers <= 1 or len(todo) <= 1:
            for p in todo:
                done(p, _run_and_store(recipe, cfg, p, str(cache_dir / p.filename(cfg.param)), fp, device))
        else:
            threads = threads_choose(workers)     # the CPUs this process may use, shared by the workers
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex, \
                    _sigterm_as_interrupt():
                futs = {ex.submit(_run_and_store, recipe, cfg, p, str(cache_dir / p.filename(cfg.param)), fp,
                                  device, threads): p for p in todo}
                try:
                    for f in as_completed(futs):
                        done(futs[f], f.result())
                except BaseException:
                    # Ctrl-C or SIGTERM: stop the workers now; a point only lands in the cache when it
                    # finished (atomic write), so the interrupted ones are simply redone on rerun
                    workers_alive = list((getattr(ex, "_processes", None) or {}).values())
                    ex.shutdown(wait=False, cancel_futures=True)
                    for proc in workers_alive:
                        proc.terminate()
                    raise
        for p, t in twins.items():
            rec = dict(results[t], parametrization="sp")
            store(cache_dir / p.filename(cfg.param), fp, rec)
            done(p, rec)
    return results


# ----------------------------------------------------------------------------------------------- analysis

def summarize(results: dict[Point, dict], cfg: SweepConfig) -> dict:
    """The sweep's JSON: per parametrization and width the values, mean losses over seeds (null when
    diverged) and fitted optimum; drift in octaves; the wider-is-better check at the shared optimum."""
    key = "lrs" if cfg.param == "lr" else "values"
    best_key = "best_log2_lr" if cfg.param == "lr" else "best_log2_value"
    xs = [math.log2(v) for v in cfg.values]
    out: dict[str, Any] = {"param": cfg.param, "results": {}, "drift_octaves": {}, "at_edge": {},
                           "wider_is_better": {}}
    for par in cfg.parametrizations:
        per_w: dict[str, Any] = {}
        optima: list[Optional[float]] = []
        curves = []
        for w in cfg.widths:
            losses = [mean_or_none([results[Point(par, w, v, s)]["loss"] for s in range(cfg.seeds)])
                      for v in cfg.values]
            o: Optimum = optimum(xs, losses)
            per_w[str(w)] = {key: list(cfg.values), "losses": losses, best_key: o.log2, "at_edge": o.at_edge}
            optima.append(o.log2)
            curves.append(losses)
        out["results"][par] = per_w
        out.setdefault("transfer", {})[par] = transfer(xs, {w: [[results[Point(par, w, v, s)]["loss"] for v in cfg.values]
                                                           for s in range(cfg.seeds)] for w in cfg.widths},
                                                       proxy=cfg.reference)
        out["drift_octaves"][par] = drift(optima)
        out["at_edge"][par] = [w for w in cfg.widths if per_w[str(w)]["at_edge"]]
        j = shared_index(curves)
        if j is None:
            out["wider_is_better"][par] = None
        else:
            pairs = [(w, c[j]) for w, c in zip(cfg.widths, curves)]
            tol = EQUAL_SAMPLES_TOL if cfg.along == "batch" and cfg.equal == "samples" else 0.0
            ok, bad = wider_is_better(pairs, tol)
            out["wider_is_better"][par] = {"value": cfg.values[j], "ok": ok, "losses": {str(w): y for w, y in pairs},
                                           "violations": [list(b) for b in bad]}
        if cfg.along:        # the transferred setting's cost at each horizon / batch, in % of that one's best
            from ..report.horizon_fit import transfer_gap
            ref = curves[list(cfg.widths).index(cfg.reference)] if cfg.reference in cfg.widths else curves[0]
            out.setdefault("transfer_gap_pct", {})[par] = {
                str(w): (None if g is None else 100 * g) for w, g in
                ((w, transfer_gap(xs, ref, c)) for w, c in zip(cfg.widths, curves))}
    out["verdict"] = verdict(out, cfg)
    rule = "mup" if "mup" in out["transfer"] else cfg.parametrizations[0]
    out["transfer_verdict"] = {"arm": rule, "verdict": out["transfer"][rule]["verdict"],
                               "exit_code": TRANSFER_EXIT[out["transfer"][rule]["verdict"]]}
    out["axis"] = cfg.axis
    if cfg.depth_width:      # the same check, named for depth (losses keyed by depth)
        out["deeper_is_better"] = out["wider_is_better"]
        out["width"] = cfg.depth_width
    if cfg.along:
        key = BETTER[cfg.axis] if cfg.equal == "steps" or cfg.along != "batch" else "larger_batch_not_worse"
        out[key] = out["wider_is_better"]
        out["width"] = cfg.fixed_width
        out["equal"] = cfg.equal if cfg.along == "batch" else None
        out["reference"] = cfg.reference
    return out


def verdict(summary: dict, cfg: SweepConfig) -> str:
    span = f"{min(cfg.widths)}→{max(cfg.widths)}"
    parts = []
    for par in cfg.parametrizations:
        d = summary["drift_octaves"].get(par)
        txt = "n/a" if d is None else f"{d:.2f} octaves"
        if summary["at_edge"].get(par):
            txt += f" (optimum at the grid's edge for {cfg.axis} " + ",".join(map(str, summary["at_edge"][par])) + ")"
        parts.append((par, txt))
    what = "" if cfg.param == "lr" else f" of {cfg.param}"
    head, *rest = parts
    label = lambda p: arm(cfg, p)  # noqa: E731
    s = f"{label(head[0])} optimum{what} drift {head[1]} across {cfg.axis} {span}"
    for par, txt in rest:
        s += f"; {label(par)} {txt}"
    return s


def wider_line(summary: dict, cfg: SweepConfig, par: str) -> str:
    w = summary["wider_is_better"].get(par)
    if w is None:
        return f"{LABEL[par]}: no {cfg.param} value finished at every width; wider-is-better not checked"
    losses = ", ".join(f"{k}: {v:.4f}" for k, v in w["losses"].items())
    word = {"width": "wider", "depth": "deeper", "horizon": "longer",
            "batch": "a larger batch" if cfg.equal == "steps" else "a larger batch (equal samples, 0.5% allowed)"}[cfg.axis]
    name = arm(cfg, par)
    if w["ok"]:
        return f"{name}: {word} is better at the shared optimum {cfg.param}={w['value']:.3g} ({losses})"
    bad = ", ".join(f"{a}→{b}" for a, b in w["violations"])
    return f"{name}: {word} is NOT always better at {cfg.param}={w['value']:.3g} (worse at {bad}; {losses})"


# ----------------------------------------------------------------------------------------------- command

def sweep(recipe: Recipe, cfg: SweepConfig, workers: int = 1, runs_dir: Path = Path("runs"), device: str = "cpu",
          json_path: Optional[Path] = None, plot_path: Optional[Path] = None, progress: bool = True,
          console=None) -> tuple[dict, int]:
    """Run (or read back) the grid, print the table and verdict, write JSON/PNG. Returns (summary, exit code)."""
    from rich.table import Table

    if workers < 1:
        raise UserError("--workers", "must be >= 1")
    if workers > available_cpus() and device == "cpu":
        raise UserError("--workers", f"{workers} workers but only {available_cpus()} CPUs are available to this process")
    guard(json_path, "--json", "sweep results", [recipe.path], ".json")
    guard(plot_path, "--plot", "sweep plot", [recipe.path], ".png")
    from ..run.experiment import check_fits, check_recipe, shapes_for

    check_recipe(recipe)
    for w in ([cfg.fixed_width] if cfg.along else cfg.widths):  # bad widths (depths): input errors, before training
        if cfg.depth_width:
            from ..run.experiment import at_depth
            rd = at_depth(recipe, w)
            shapes_for(rd, cfg.depth_width)
            check_fits(rd, cfg.depth_width, "--depths", device)
        else:
            shapes_for(recipe, w)
            check_fits(recipe, w, "--widths", device)
    console = console or make_console()
    cache = Path(runs_dir) / recipe.name / "sweep"
    results = run_grid(recipe, cfg, cache, workers, device, progress)
    summary = summarize(results, cfg)
    summary.update({"steps": cfg.steps, "batch_size": cfg.batch_size, "seeds": cfg.seeds,
                    "loss": (f"training loss averaged over the last {cfg.average_last} steps" if not cfg.along else
                             "training loss averaged over the last 10% of each run's steps (at least 5)"),
                    "widths": list(cfg.widths)})

    table = Table(title=(f"width {cfg.depth_width or cfg.fixed_width}, " if cfg.depth_width or cfg.fixed_width else "") + f"sweep of {cfg.param}: {recipe.name}, {cfg.steps} steps, batch {cfg.batch_size}, "
                        f"{cfg.seeds} seed(s)")
    table.add_column("param.")
    table.add_column(cfg.axis, justify="right")
    table.add_column(f"best {cfg.param}", justify="right")
    table.add_column("log2", justify="right")
    table.add_column("best loss", justify="right")
    table.add_column("diverged", justify="right")
    best_key = "best_log2_lr" if cfg.param == "lr" else "best_log2_value"
    for par, per_w in summary["results"].items():
        for w, d in per_w.items():
            fin = [y for y in d["losses"] if y is not None]
            b = d[best_key]
            table.add_row(arm(cfg, par), w, "-" if b is None else f"{2 ** b:.3g}" + (" (edge)" if d["at_edge"] else ""),
                          "-" if b is None else f"{b:.2f}", f"{min(fin):.4f}" if fin else "-",
                          f"{len(d['losses']) - len(fin)}/{len(d['losses'])}")
    console.print(table)
    console.print(summary["verdict"], highlight=False)
    for par in cfg.parametrizations:
        console.print(wider_line(summary, cfg, par), highlight=False)
    if cfg.along:
        top = str(max(cfg.widths))
        gaps = "; ".join(f"{arm(cfg, par)} " + ("n/a" if g.get(top) is None else f"{g[top]:+.2f}%")
                         for par, g in summary.get("transfer_gap_pct", {}).items())
        console.print(f"loss at {cfg.axis} {top} with the {cfg.param} transferred from {cfg.reference}, over that "
                      f"{cfg.axis}'s best: {gaps}", highlight=False)
    gate = summary["transfer_verdict"]["arm"]     # the transfer verdict, the rule's arm last (the line to gate on)
    for par in [p for p in cfg.parametrizations if p != gate] + [gate]:
        console.print(transfer_line(summary["transfer"][par], arm(cfg, par), cfg.param, cfg.axis), highlight=False)

    if json_path:
        write_json_atomic(Path(json_path), {"written_by": marker("sweep results"), **summary})
        console.print(f"wrote {literal(json_path)}", highlight=False)
    if plot_path:
        from ..report.sweep_plot import plot_sweep

        plot_sweep(summary, Path(plot_path), title=f"{recipe.name}: {cfg.steps} steps, batch {cfg.batch_size}")
        console.print(f"wrote {literal(plot_path)}", highlight=False)
    errors = [r for r in results.values() if r.get("error")]
    if errors:
        console.print(f"[yellow]{len(errors)} point(s) failed (not cached; a rerun retries them), e.g. "
                      f"width {errors[0]['width']}, {cfg.param}={errors[0]['value']:.3g}: {literal(errors[0]['error'])}[/]",
                      highlight=False)
    failed = all(r["loss"] is None for r in results.values())
    if failed:
        console.print("[red]every grid point diverged or failed[/]")
    return summary, 1 if failed else summary["transfer_verdict"]["exit_code"]


def sweep_command(recipe_path: Path, widths: Optional[str] = None, lrs: Optional[str] = None,
                  lr_range: Optional[str] = None, param: Optional[str] = None, parametrization: Optional[str] = None,
                  seeds: Optional[int] = None, steps: Optional[int] = None, batch_size: Optional[int] = None,
                  workers: int = 1, device: str = "cpu", json_path: Optional[Path] = None,
                  plot_path: Optional[Path] = None, runs_dir: Path = Path("runs"), log: tuple = (),
                  depths: Optional[str] = None, width: Optional[int] = None, horizons: Optional[str] = None,
                  batch_sizes: Optional[str] = None, equal: Optional[str] = None) -> int:
    """The CLI's one call: parse the flag strings, build the config, sweep. Returns the exit code."""
    from ..run.experiment import resolve_device
    from ..run.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    if lrs and lr_range:
        raise UserError("--lrs", "give --lrs or --lr-range, not both")
    values = parse_list(lrs, "--lrs") if lrs else parse_range(lr_range) if lr_range else None
    ws = parse_list(widths, "--widths", int) if widths else None
    ds = parse_list(depths, "--depths", int) if depths else None
    hs = parse_list(horizons, "--horizons", int) if horizons else None
    bs = parse_list(batch_sizes, "--batch-sizes", int) if batch_sizes else None
    cfg = make_config(recipe, ws, values, param, parametrization, seeds, steps, batch_size, ds, width, hs, bs, equal)
    if cfg.along:
        cfg = SweepConfig(**{**cfg.__dict__, "measured": measured_horizon(recipe, Path(runs_dir))})
    kinds = check_kinds(list(log))
    summary, code = sweep(recipe, cfg, workers, runs_dir, resolve_device(device), json_path, plot_path)
    if kinds:
        log_sweep(kinds, Path(runs_dir) / recipe.name / "sweep", recipe.name, summary, cfg)
    return code


def log_sweep(kinds: list[str], folder: Path, name: str, summary: dict, cfg: SweepConfig) -> None:
    """Loss per grid point (step = the value's index in the grid) and the drift, to the loggers."""
    lg = Loggers(kinds, folder, f"{name}-sweep", {"param": cfg.param, "steps": cfg.steps})
    key = "lrs" if cfg.param == "lr" else "values"
    try:
        for par, per_w in summary["results"].items():
            for w, d in per_w.items():
                for i, y in enumerate(d["losses"]):
                    lg.log(i, {f"sweep/{par}/width{w}/loss": y, f"sweep/{par}/width{w}/log2_{cfg.param}":
                               math.log2(d[key][i])})
        lg.log(0, {f"sweep/drift_octaves/{k}": v for k, v in summary.get("drift_octaves", {}).items()})
    finally:
        lg.close()
