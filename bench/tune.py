"""Benchmark of `mutransfer tune` on one recipe (default: recipes/mlp-pysource.yaml, fewer steps).

(a) Sample efficiency. A 16-point log-spaced LR grid over search.params.lr, each point trained with
    `--seeds` seeds, gives the grid's best mean validation loss L* and the seed-to-seed standard
    deviation s at that point. Then, for several sampler seeds, a TPE + median-pruner study (the very
    sampler, pruner and objective `tune` uses, in memory) runs until its best value is <= L* + s;
    the number of trials it needed (pruned ones included) is compared with the grid's size. A TPE
    trial's value is the mean over the same seeds as a grid point's.
    Goal: <= 1/3 of the grid (16 / 3).
(b) Cost of the proxy search vs the same search at the target width:
    - FLOPs, counted by torch.utils.flop_counter.FlopCounterMode on the meta device for one training
      step (forward + backward) and one validation batch, at both widths, multiplied by the steps and
      validations the TPE studies of (a) actually ran (pruned trials stop early);
    - wall time of `--wall-trials` full trials at each width (same objective, fixed values).
    Goal: <= 5 %.

    python bench/tune.py                       # a few minutes on 2 CPU cores
    python bench/tune.py --recipe recipes/quickstart.yaml --steps 60
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import optuna
import torch
from optuna.trial import FixedTrial, TrialState
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mutransfer.commands.tuning import Objective  # noqa: E402
from mutransfer.engine.shapes import build_meta  # noqa: E402
from mutransfer.run import experiment  # noqa: E402
from mutransfer.run.batched_trials import report_every  # noqa: E402
from mutransfer.run.recipe import load_recipe  # noqa: E402
from mutransfer.run.search import pruner_for, sampler_for  # noqa: E402
from mutransfer.run.train import loss_fn  # noqa: E402

DEVICE = "cpu"      # --device: where every trial of (a) and (b) trains


def with_overrides(recipe, steps, seeds):
    """Only lr searched; every value (grid point or TPE trial) the mean over the same `seeds` seeds."""
    d = recipe.model_dump()
    if steps:
        d["train"]["steps"] = steps
        d["train"]["eval_every"] = 0
    d["search"]["params"] = {"lr": d["search"]["params"]["lr"]}
    d["search"]["seeds"] = seeds
    return type(recipe).model_validate(d)


def lr_grid(recipe, n):
    r = recipe.search.params["lr"]
    lo, hi = math.log(r.low), math.log(r.high)
    return [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def grid_search(recipe, width, n):
    """{lr: (mean final val loss over seeds, [per seed])}; a diverged point is its penalty."""
    obj = Objective(recipe, width, DEVICE)
    out = {}
    for lr in lr_grid(recipe, n):
        trial = FixedTrial({"lr": lr})
        value = obj(trial)
        out[lr] = (value, trial.user_attrs.get("seed_values") or [value] * recipe.search.seeds)
    return out


def trials_to_reach(recipe, width, target, budget, sampler_seed, sampler="tpe", pruner="median"):
    """Trials (pruned included) a study needs for a value <= target (None: not within budget); the study."""
    r = recipe.model_copy(update={"search": recipe.search.model_copy(update={"sampler": sampler, "pruner": pruner})})
    study = optuna.create_study(direction="minimize", sampler=sampler_for(r, budget, sampler_seed),
                                pruner=pruner_for(r, budget))
    obj = Objective(r, width, DEVICE)
    needed = None
    for i in range(budget):
        study.optimize(obj, n_trials=1)
        t = study.trials[-1]
        if t.state == TrialState.COMPLETE and not t.user_attrs.get("diverged") and t.value <= target:
            needed = i + 1
            break
    return needed, study


def step_flops(recipe, width):
    """(training step fwd+bwd, one validation batch fwd) FLOPs at `width`, on the meta device."""
    x, y = experiment.first_batch(experiment.data_stream(recipe, "train", 0))
    model = build_meta(experiment.model_factory(recipe), width, recipe.model.args)
    xm, ym = x.to("meta"), y.to("meta")
    with FlopCounterMode(display=False) as fc:
        loss_fn(recipe.loss, model(xm), ym).backward()
    train_f = fc.get_total_flops() * recipe.train.grad_accum
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        loss_fn(recipe.loss, model(xm), ym)
    return float(train_f), float(fc.get_total_flops())


def search_flops(recipe, studies, flops):
    """FLOPs of the trials these studies ran: steps run x step FLOPs + validations x eval FLOPs."""
    train_f, eval_f = flops
    every, steps, nval = report_every(recipe), recipe.train.steps, recipe.train.eval_batches
    seeds = recipe.search.seeds
    total = 0.0
    for st in studies:
        for t in st.trials:
            run = t.user_attrs.get("steps_run", 0)
            each = run // seeds                      # a trial's seeds train side by side, as far as each other
            evals = seeds * (1 + each // every + (1 if each == steps and steps % every else 0))
            total += run * train_f + evals * nval * eval_f
    return total


def wall_trials(recipe, width, n, lr, group=1, device="cpu"):
    """Seconds per full trial of one seed at `width` (validation batches prepared beforehand) and the
    steps each ran (a diverged trial stops early, so use an LR safe at both widths). group > 1: the n
    trials run in groups of that many (batched trials, as `tune --parallel-trials`), the same mode at
    both widths."""
    from mutransfer.engine.hparams import HParams
    from mutransfer.run.batched_trials import run_group

    recipe = recipe.model_copy(update={"search": recipe.search.model_copy(update={"seeds": 1})})
    val = experiment.val_batches(recipe, recipe.train.eval_batches, seed=recipe.train.seed)
    hp = HParams.from_train(recipe.train).with_values({"lr": lr})
    t0, steps = time.perf_counter(), []
    for start in range(0, n, group):
        k = min(group, n - start)
        trials = [FixedTrial({"lr": lr}) for _ in range(k)]
        steps += [o.attrs["steps_run"] for o in run_group(recipe, width, device, trials, [hp] * k, val)]
    return (time.perf_counter() - t0) / n, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/mlp-pysource.yaml")
    ap.add_argument("--steps", type=int, default=100, help="train.steps override (0: the recipe's)")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per grid point and per TPE trial")
    ap.add_argument("--sampler-seeds", type=int, default=8)
    ap.add_argument("--budget", type=int, default=16, help="max TPE trials per sampler seed")
    ap.add_argument("--wall-trials", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel-trials", type=int, default=1,
                    help="(b)'s wall-time trials in groups of this many, at both widths (the same mode)")
    ap.add_argument("--device", default="cpu", help="where the trials train: cpu | cuda")
    ap.add_argument("--no-random-baseline", dest="random_baseline", action="store_false",
                    help="skip the random-search baseline of (a)")
    ap.add_argument("--no-throughput", dest="throughput", action="store_false",
                    help="skip (c), trials per hour one at a time vs batched vs workers (bench/tune_throughput.py)")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    recipe = with_overrides(load_recipe(a.recipe), a.steps, a.seeds)
    proxy, target = recipe.widths.proxy, recipe.widths.target
    print(f"recipe {a.recipe}: proxy width {proxy}, target width {target}, {recipe.train.steps} steps, "
          f"lr in [{recipe.search.params['lr'].low:g}, {recipe.search.params['lr'].high:g}] (log)")

    t0 = time.perf_counter()
    grid = grid_search(recipe, proxy, a.grid)
    means = {lr: m for lr, (m, _) in grid.items()}
    best_lr = min(means, key=means.get)
    sd = statistics.stdev(grid[best_lr][1]) if a.seeds > 1 else 0.0
    target_value = means[best_lr] + sd
    print(f"\n(a) {a.grid}-point LR grid x {a.seeds} seeds ({time.perf_counter() - t0:.0f} s):")
    for lr, m in means.items():
        mark = "  <- best" if lr == best_lr else ""
        print(f"    lr {lr:9.3g}  val {m:8.4f}  (seeds: {', '.join(f'{v:.4f}' for v in grid[lr][1])}){mark}")
    print(f"    best {means[best_lr]:.4f} at lr {best_lr:.3g}; seed-to-seed std {sd:.4f}; "
          f"target <= {target_value:.4f}")
    needed, studies = [], []
    for s in range(a.sampler_seeds):
        n, st = trials_to_reach(recipe, proxy, target_value, a.budget, s)
        studies.append(st)
        needed.append(n)
        pruned = sum(t.state == TrialState.PRUNED for t in st.trials)
        best = min((t.value for t in st.trials if t.state == TrialState.COMPLETE), default=float("nan"))
        print(f"    TPE+pruning ({a.seeds} seeds per trial), sampler seed {s}: "
              f"{'reached in ' + str(n) if n else 'not reached in ' + str(a.budget)} trials "
              f"({pruned} pruned; best {best:.4f})")
    reached = [n for n in needed if n]
    med = statistics.median([n if n else math.inf for n in needed])
    print(f"    trials needed: {needed} -> median {med}, mean over reached "
          f"{statistics.fmean(reached) if reached else float('nan'):.2f}; grid size {a.grid}; "
          f"median/grid = {med / a.grid:.3f} (goal <= 1/3 = {1 / 3:.3f})")
    if a.random_baseline:
        rand = [trials_to_reach(recipe, proxy, target_value, a.budget, s, "random", "none")[0]
                for s in range(a.sampler_seeds)]
        print(f"    baseline, random search without pruning, same sampler seeds: {rand} -> median "
              f"{statistics.median([n if n else math.inf for n in rand])}")

    fp, ft = step_flops(recipe, proxy), step_flops(recipe, target)
    sp, stt = search_flops(recipe, studies, fp), search_flops(recipe, studies, ft)
    print("\n(b) cost of the proxy search vs the same search at the target width:")
    print(f"    FLOPs per training step: proxy {fp[0]:.3e}, target {ft[0]:.3e} -> ratio {fp[0] / ft[0]:.4f}")
    print(f"    FLOPs of the {sum(len(s.trials) for s in studies)} TPE trials above (steps actually run, pruned "
          f"ones stop early; {a.seeds} seeds each): proxy {sp:.3e}, target {stt:.3e} -> ratio {sp / stt:.4f} (goal <= 0.05)")
    lr = recipe.search.params["lr"].low
    wp, sp_steps = wall_trials(recipe, proxy, a.wall_trials, lr, a.parallel_trials, a.device)
    wt, st_steps = wall_trials(recipe, target, a.wall_trials, lr, a.parallel_trials, a.device)
    print(f"    wall time per full trial ({a.wall_trials} trials each at lr {lr:g} in groups of {a.parallel_trials} on "
          f"{a.device}, steps run {sp_steps} / "
          f"{st_steps}, {a.threads} torch thread(s)): proxy {wp:.2f} s, target {wt:.2f} s -> ratio {wp / wt:.4f} "
          f"(goal <= 0.05)")
    if a.throughput:
        print("\n(c) trials per hour: --parallel-trials 1 vs batched vs --workers (bench/tune_throughput.py)")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import tune_throughput

        tune_throughput.main(["--trials", "16", "--repeats", "1"])


if __name__ == "__main__":
    main()
