"""`mutransfer predict`: the target's final validation loss, predicted from a ladder of narrower models.

    run_predict(PredictOptions(recipe="recipes/mlp-pysource.yaml")) -> PredictResult

With the tuned hyperparameters (the hparams file `tune` writes, resolved exactly as `scale` resolves
it) every rung of the ladder (a width, times --seeds seeds) is trained the way `scale` trains the
target: the steps and batch `scale --width W` would use (experiment.target_run: flags, else the
recipe's `target:` section, else train's), the horizon and batch factors from the tuning run to
those (scale.horizon_of), experiment.build at that width relative to the tuning width, the same data
stream and validation batches, train.train (THE loop). Seed offset 0 is the very run `scale --width W`
would make. Each rung's final validation loss is cached (runs/<name>/predict/<setup>/), so
an interrupted ladder resumes where it stopped and a rerun only refits.

L = E + A·x^-α is fitted over parameters, compute or width (report/predict_fit.py), the prediction
and its interval for each target width go into the hparams file's `prediction:` field, and `scale`
compares its final validation loss with it (predict_check.check_scale). The default ladder: halvings
of the target width, the widest `--rungs` consecutive ones whose runs (all seeds) cost at most
`--budget` of the target run (estimated FLOPs per step × steps, as the dry run estimates them).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..atomic import write_json
from ..console import PlainLines, make_console, progress_bar
from ..errors import UserError
from ..outputs_guard import check_output, marker
from ..report.predict_fit import FIT_ON, check_ladder, fit_ladder
from ..run import experiment
from ..run.hparams_file import default_path, write_prediction
from ..run.recipe import Recipe, load_recipe, recipe_to_dict
from .predict_check import check_scale  # noqa: F401 - scale's side of it, importable from here too


@dataclass
class PredictOptions:
    recipe: str
    hparams: Optional[str] = None
    widths: Optional[str] = None        # the ladder, comma-separated (default: chosen by --budget)
    target: Optional[str] = None        # target width(s), comma-separated (default widths.target)
    seeds: int = 2
    fit_on: str = "params"              # params | compute | width
    budget: float = 0.25                # the default ladder's cost, as a fraction of the (smallest) target run
    rungs: int = 3                      # widths in the default ladder
    steps: Optional[int] = None         # every run's steps (default: as scale decides them per width)
    batch_size: Optional[int] = None    # every run's batch (default: as scale)
    level: float = 0.95
    device: str = "auto"
    plot: Optional[str] = None          # default runs/<name>/predict/prediction.png
    json_path: Optional[str] = None
    runs_dir: str = "runs"
    depth: Optional[int] = None         # the target's depth (default depths.target, as scale)


@dataclass
class PredictResult:
    exit_code: int
    prediction: dict = field(default_factory=dict)


def parse_widths(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        ws = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(flag, f"expected comma-separated integers, got {text!r}") from None
    if not ws or any(w <= 0 for w in ws):
        raise UserError(flag, f"widths must be positive integers, got {text!r}")
    return sorted(set(ws))


def choose_ladder(candidates: list[int], cost: dict[int, float], target_cost: float, seeds: int, rungs: int,
                  budget: float) -> list[int]:
    """The widest `rungs` consecutive candidates (ascending) whose seeds × runs cost <= budget × target."""
    cs = sorted(candidates)
    for top in range(len(cs), rungs - 1, -1):
        ladder = cs[top - rungs:top]
        if seeds * sum(cost[w] for w in ladder) <= budget * target_cost:
            return ladder
    return []


def _fingerprint(recipe: Recipe, hp: dict, base_width: int, base_depth: Optional[int], file: dict) -> str:
    d = recipe_to_dict(recipe)
    for k in ("name", "search", "coord_check", "sweep", "widths"):
        d.pop(k, None)
    for k in ("steps", "eval_every", "log_every"):
        d["train"].pop(k, None)
    d["predict_run"] = {"hparams": hp, "base_width": base_width, "base_depth": base_depth,
                        # what horizon_of reads: the tuning run's steps, batch and measured exponents
                        "tuned_run": [file.get("steps"), file.get("batch_size"), file.get("horizon")],
                        "depth": experiment.depth_of(recipe)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cost(recipe: Recipe, width: int, src, steps: int, batch: int) -> tuple[int, float]:
    """(parameters, training FLOPs of one run) at `width`: the dry run's estimate (6·N·tokens without one)."""
    import warnings

    from ..report.explain import explain

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, _, cost = explain(recipe, width, src.hparams, base_width=src.base_width, base_depth=src.base_depth)
    per_step = cost.flops_per_step
    if not per_step:
        x, y = experiment.first_batch(experiment.data_stream(recipe, "train", recipe.train.seed))
        per_step = 6.0 * plan.numel * (y.numel() if y.dim() >= 2 else x.shape[0]) * recipe.train.grad_accum
    return int(plan.numel), float(per_step) * steps * batch / recipe.train.batch_size   # counted at train's batch


class _Steps:
    """Callback: advance the progress bar by one per optimizer step."""

    def __init__(self, advance):
        self.advance = advance

    def on_step(self, state) -> None:
        self.advance()


def train_rung(recipe: Recipe, width: int, src, steps: int, batch: int, seed_offset: int, device: str, val: list,
               callbacks=()) -> dict:
    """One rung, one seed, trained like `scale` trains the target; its final validation loss."""
    from ..run.train import train
    from .scale import horizon_of

    seed = recipe.train.seed + seed_offset
    t0 = time.perf_counter()
    hz = horizon_of(recipe, src, steps, batch)
    pm = experiment.build(recipe, width, src.hparams, device=device, seed=seed, base_width=src.base_width,
                          base_depth=src.base_depth, horizon=hz)
    data = experiment.data_stream(recipe, "train", seed, batch)
    cfg = experiment.train_config(recipe, device, steps=steps, warmup=hz.warmup, eval_every=0)
    state = train(pm.model, pm.optimizer, data, cfg, val_batches=val, callbacks=list(callbacks))
    ok = not state.diverged and state.val_loss is not None and math.isfinite(state.val_loss)
    return {"width": width, "seed": seed_offset, "val_loss": state.val_loss if ok else None,
            "reason": state.reason if not ok else "", "steps": state.step, "batch_size": batch,
            "seconds": round(time.perf_counter() - t0, 3)}


def run_predict(o: PredictOptions, console=None) -> PredictResult:
    console = console or make_console()
    from ..commands.scale import resolve_hparams

    recipe = load_recipe(o.recipe)
    if o.depth is not None or recipe.depths is not None:
        recipe = experiment.at_depth(recipe, o.depth if o.depth is not None else recipe.depths.target)
    if o.fit_on not in FIT_ON:
        raise UserError("--fit-on", f"must be one of {', '.join(FIT_ON)}, got {o.fit_on!r}")
    if o.seeds < 1:
        raise UserError("--seeds", f"must be >= 1, got {o.seeds}")
    if not 0 < o.budget:
        raise UserError("--budget", f"must be > 0 (a fraction of the target run), got {o.budget}")
    if o.rungs < 3:
        raise UserError("--rungs", f"a ladder of {o.rungs} width(s) is too short to fit E + A·x^-α; use >= 3")
    if not 0 < o.level < 1:
        raise UserError("--level", f"must be between 0 and 1, got {o.level}")
    if o.steps is not None and o.steps <= 0:
        raise UserError("--steps", "must be > 0")
    if o.batch_size is not None and o.batch_size <= 0:
        raise UserError("--batch-size", "must be > 0")
    targets = parse_widths(o.target, "--width") or [recipe.widths.target]
    ladder = parse_widths(o.widths, "--widths")
    if ladder is not None:
        check_ladder(ladder, [[0.0] * o.seeds] * len(ladder))
        if max(ladder) >= min(targets):
            raise UserError("--widths", f"the ladder's widest rung {max(ladder)} is not below the target "
                            f"width {min(targets)}")
    device = experiment.resolve_device(o.device)
    src = resolve_hparams(recipe, o.hparams, o.runs_dir)
    if src.file is None:
        raise UserError("--hparams", f"no hparams file ({default_path(recipe.name, o.runs_dir)} does not exist): "
                        "run `mutransfer tune` first or pass --hparams PATH; the prediction is written there")
    hp_path = Path(o.hparams) if o.hparams else default_path(recipe.name, o.runs_dir)
    check_output(hp_path, "--hparams", "hparams")      # we add a field to it: it must be ours
    folder = Path(o.runs_dir) / recipe.name / "predict"
    plot_path = check_output(o.plot or folder / "prediction.png", "--plot", "prediction plot", [Path(o.recipe)],
                             ".png")
    json_path = check_output(o.json_path, "--json", "prediction", [Path(o.recipe)], ".json")
    for w in targets:
        if w < src.base_width:
            raise UserError("--width", f"{w} is below the width the hparams were tuned at ({src.base_width})")
        experiment.shapes_for(recipe, w)
    experiment.check_recipe(recipe)

    # --- costs (meta device), and the ladder
    run: dict[int, tuple[int, int]] = {}          # width -> (steps, batch), as `scale --width` decides them

    def cost_at(w: int) -> tuple[int, float]:
        run[w] = experiment.target_run(recipe, w, o.steps, o.batch_size)
        return _cost(recipe, w, src, *run[w])

    costs: dict[int, tuple[int, float]] = {w: cost_at(w) for w in targets}
    t_cost = min(costs[w][1] for w in targets)
    if ladder is None:
        cands, w = [], min(targets) // 2
        while w >= 4 and len(cands) < 12:
            try:
                experiment.shapes_for(recipe, w)
                costs[w] = cost_at(w)
                cands.append(w)
            except UserError:
                pass
            w //= 2
        ladder = choose_ladder(cands, {w: costs[w][1] for w in cands}, t_cost, o.seeds, o.rungs, o.budget)
        if not ladder:
            raise UserError("--budget", f"no ladder of {o.rungs} halvings of width {min(targets)} with {o.seeds} "
                            f"seed(s) costs <= {o.budget:g} of the target run; raise --budget or give --widths")
    for w in ladder:
        experiment.shapes_for(recipe, w)
        experiment.check_fits(recipe, w, "--widths", device)
        if w not in costs:
            costs[w] = cost_at(w)

    # --- the rungs: cached ones read back, the rest trained
    hp_flat = src.hparams.flat()
    fp = _fingerprint(recipe, hp_flat, src.base_width, src.base_depth, src.file)
    cache = folder / fp
    val = experiment.val_batches(recipe, recipe.train.eval_batches, seed=recipe.train.seed)
    records: dict[tuple[int, int], dict] = {}
    todo = []
    for w in ladder:
        for s in range(o.seeds):
            rec = _load(cache / _name(w, s, run[w]), fp)
            if rec is not None and rec.get("width") == w and rec.get("seed") == s and rec.get("steps") == run[w][0]:
                records[(w, s)] = rec
            else:
                todo.append((w, s))
    frac = o.seeds * sum(costs[w][1] for w in ladder) / t_cost
    console.print(f"[bold]predict[/] {recipe.name}: ladder widths {', '.join(map(str, ladder))} × {o.seeds} "
                  f"seed(s), {_runs_text([run[w] for w in ladder])}; estimated cost {100 * frac:.1f}% of the "
                  f"width-{min(targets)} target run; hparams: {src.source}"
                  + (f"; {len(records)} of {len(ladder) * o.seeds} runs cached in {cache}" if records else ""),
                  highlight=False)
    _train_all(recipe, todo, src, run, device, val, cache, fp, records, console)
    bad = [r for r in records.values() if r["val_loss"] is None]
    if bad:
        console.print(f"[red]width {bad[0]['width']} seed {bad[0]['seed']} diverged[/] ({bad[0]['reason']}): "
                      "no prediction. The tuned values do not hold on this ladder.", highlight=False)
        return PredictResult(1, {})

    # --- the fit
    def xof(w: int) -> float:
        return {"params": float(costs[w][0]), "compute": costs[w][1], "width": float(w)}[o.fit_on]

    losses = [[records[(w, s)]["val_loss"] for s in range(o.seeds)] for w in ladder]
    p = fit_ladder([xof(w) for w in ladder], losses, [xof(w) for w in targets], level=o.level)
    ladder_s = sum(r["seconds"] for r in records.values())
    prediction = {
        "made": datetime.now(timezone.utc).isoformat(timespec="seconds"), "recipe": str(o.recipe),
        "fit_on": o.fit_on, "level": o.level,
        "method": p.method, "noise": p.noise,
        "proxy_width": src.base_width, "depth": experiment.depth_of(recipe), "hparams": hp_flat,
        "tuned": (src.file or {}).get("hparams"),
        "fit": {"E": p.fit.E, "A": p.fit.A, "alpha": p.fit.alpha,
                **{f"{k}_interval": v for k, v in p.intervals.items()}},
        "ladder": [{"width": w, "params": costs[w][0], "flops": costs[w][1], "x": xof(w), "steps": run[w][0],
                    "batch_size": run[w][1], "losses": losses[i]} for i, w in enumerate(ladder)],
        "ladder_seconds": round(ladder_s, 1),
        "targets": {str(w): {"x": t["x"], "params": costs[w][0], "flops": costs[w][1], "steps": run[w][0],
                             "batch_size": run[w][1], "loss": t["loss"],
                             "low": t["low"], "high": t["high"],
                             "ladder_cost": o.seeds * sum(costs[v][1] for v in ladder) / costs[w][1]}
                    for w, t in zip(targets, p.targets)},
    }
    prediction = _plain(prediction)
    write_prediction(hp_path, prediction)
    _report(prediction, console, hp_path)
    measured = _scale_points(recipe, o.runs_dir, prediction)
    from ..report.predict_plot import plot_prediction

    plot_prediction(prediction, plot_path, measured, title=f"{recipe.name}: {_runs_text([run[w] for w in ladder])}")
    console.print(f"plot -> {plot_path}", highlight=False)
    if json_path:
        write_json(json_path, {"written_by": marker("prediction"), **prediction, "measured": measured},
                   allow_nan=False)
        console.print(f"wrote {json_path}", highlight=False)
    return PredictResult(0, prediction)


def _name(w: int, s: int, run: tuple[int, int]) -> str:
    return f"w{w}-s{s}-n{run[0]}-b{run[1]}.json"


def _runs_text(runs: list) -> str:
    steps, batches = sorted({r[0] for r in runs}), sorted({r[1] for r in runs})
    return ("/".join(map(str, steps)) + " steps" + (" each" if len(steps) == 1 else "") + ", batch "
            + "/".join(map(str, batches)))


def _train_all(recipe, todo, src, run, device, val, cache, fp, records, console) -> None:
    if not todo:
        return
    todo = sorted(todo, key=lambda p: (p[0], p[1]))
    with progress_bar("[bold]predict", console=console) as bar:
        task = bar.add_task("", total=sum(run[w][0] for w, _ in todo))
        plain = PlainLines(console, "predict: runs", len(todo))
        for i, (w, s) in enumerate(todo):
            bar.update(task, description=f"width {w} seed {s}")
            rec = train_rung(recipe, w, src, *run[w], s, device, val, [_Steps(lambda: bar.advance(task))])
            rec["fingerprint"] = fp
            if rec["val_loss"] is not None:
                write_json(cache / _name(w, s, run[w]), {"written_by": marker("predict rung"), **rec}, allow_nan=False)
            records[(w, s)] = rec
            plain.update(i + 1, f"width {w} seed {s}: " + (f"{rec['val_loss']:.4f}" if rec["val_loss"] is not None
                                                           else "diverged"))


def _load(path: Path, fp: str) -> Optional[dict]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("fingerprint") != fp or not isinstance(d.get("val_loss"), (int, float)):
        return None
    return d


def _plain(x):
    """numpy scalars and tuples to plain YAML-able values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _report(pred: dict, console, hp_path: Path) -> None:
    from rich.table import Table

    tb = Table(title="ladder (final validation loss)")
    for c in ("width", "parameters", "steps", "batch", f"x ({pred['fit_on']})", "losses (per seed)", "mean",
              "fit"):
        tb.add_column(c, justify="right")
    f = pred["fit"]
    for r in pred["ladder"]:
        m = sum(r["losses"]) / len(r["losses"])
        tb.add_row(str(r["width"]), f"{r['params']:,}", str(r["steps"]), str(r["batch_size"]), f"{r['x']:.4g}",
                   ", ".join(f"{v:.4f}" for v in r["losses"]),
                   f"{m:.4f}", f"{f['E'] + f['A'] * r['x'] ** -f['alpha']:.4f}")
    console.print(tb)
    lv = f"{100 * pred['level']:g}%"
    console.print(f"fit: L = E + A·x^-α with E = {f['E']:.4f} [{f['E_interval'][0]:.4f}, {f['E_interval'][1]:.4f}], "
                  f"α = {f['alpha']:.3f} [{f['alpha_interval'][0]:.3f}, {f['alpha_interval'][1]:.3f}] "
                  f"({lv} intervals, bootstrap over {pred['method']})", highlight=False)
    for w, t in pred["targets"].items():
        console.print(f"[bold]predicted[/] width {w}: validation loss {t['loss']:.4f} [{t['low']:.4f}, "
                      f"{t['high']:.4f}] ({lv}); the ladder costs {100 * t['ladder_cost']:.1f}% of this run "
                      f"({pred['ladder_seconds']:.0f} s of training here)", highlight=False)
    console.print(f"prediction -> {hp_path} (`scale` compares with it at the end)", highlight=False)


def _scale_points(recipe: Recipe, runs_dir: str, pred: dict) -> dict:
    """Finished scale runs in the default folders whose check used this prediction: {width: val loss}."""
    out = {}
    dep = pred.get("depth")
    for w in pred["targets"]:
        s = _read(Path(runs_dir) / recipe.name / (f"scale-{w}" + (f"-d{dep}" if dep is not None else "")) / "summary.json")
        c = s.get("prediction") or {}
        if s.get("status") == "finished" and c.get("status") in ("ok", "missed") and c.get("predicted") == \
                pred["targets"][w]["loss"]:
            out[w] = s.get("val_loss")
    return out


def _read(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}
