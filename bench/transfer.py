"""The transfer benchmark: does the LR tuned on the narrow proxy give the wide target the loss of the
target's own best LR?

    python bench/transfer.py recipes/mlp-pysource.yaml --lr-range 1.220703125e-4:0.5:13 --seeds 2 --workers 2

1. Tune at the proxy (muP and SP are the same model there): an LR grid at widths.proxy, the optimum
   fitted by the sweep's parabola rule -> lr*; and, unless --optuna-trials 0, mutransfer.tune's Optuna
   study over lr alone (its own objective: validation loss after train.steps) -> a second lr*.
2. Transfer: train widths.target at each lr* under muP, and under the SP control (same LR, SP scaling).
3. Direct: the same LR grid at the target width under each parametrization, refined by two extra
   points half an octave either side of its best grid point; its best mean loss is the baseline.
Prints, per parametrization, target loss at the transferred LR / best direct loss (goal under muP:
within 1 %), and the compute of tuning at the proxy against tuning at the target directly.

Every run goes through mutransfer.sweep (experiment.build + train.train) and its per-point cache in
runs/<name>/sweep/ (shared with `mutransfer sweep`, so a sweep already run is reused; --cache-dir
elsewhere to measure from scratch). Losses: training loss averaged over the last steps, mean over seeds.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mutransfer.commands import sweep as sw  # noqa: E402
from mutransfer.errors import UserError  # noqa: E402
from mutransfer.report.sweep_fit import mean_or_none, optimum  # noqa: E402
from mutransfer.run.recipe import load_recipe  # noqa: E402

DEVICE = "cpu"


def _grid(recipe, cfg, widths, values, pars, cache, workers):
    c = sw.SweepConfig(cfg.param, tuple(sorted(set(values))), tuple(widths), tuple(pars), cfg.seeds, cfg.steps,
                       cfg.batch_size, cfg.average_last, cfg.divergence_factor)
    return c, sw.run_grid(recipe, c, cache, workers, DEVICE)


def _curve(c, res, par, width):
    return [mean_or_none([res[sw.Point(par, width, v, s)]["loss"] for s in range(c.seeds)]) for v in c.values]


def _seconds(res):
    return sum(r.get("seconds", 0.0) for r in res.values())


def _tune_with_optuna(recipe, a, proxy: int, workdir: Path) -> float:
    """lr* from mutransfer.tune's library function: an Optuna study over lr only at the proxy."""
    from mutransfer.commands.tune_options import TuneOptions
    from mutransfer.commands.tuning import make_options, tune
    from mutransfer.run.hparams_file import read_hparams_file
    from mutransfer.run.recipe import Range

    r = recipe.model_copy(deep=True)
    r.search.params = {"lr": r.search.params.get("lr") or Range(low=min(a._values), high=max(a._values), log=True)}
    workdir.mkdir(parents=True, exist_ok=True)
    opts = make_options(r, TuneOptions(recipe=a.recipe, trials=a.optuna_trials, width=proxy,
                                       storage=f"sqlite:///{workdir / 'study.db'}", study_name=f"{r.name}-lr",
                                       out=workdir / "hparams.yaml", device="cpu"))
    if tune(opts, r) != 0:
        raise SystemExit("tune failed")
    return float(read_hparams_file(opts.out)["hparams"]["lr"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--lr-range", default=None, help="LOW:HIGH:POINTS grid (default: octaves around train.lr)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--proxy", type=int, default=None, help="default widths.proxy")
    ap.add_argument("--target", type=int, default=None, help="default widths.target")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the grid points' device)")
    ap.add_argument("--cache-dir", default=None, help="default runs/<name>/sweep")
    ap.add_argument("--json", default=None, help="write the figures as JSON")
    ap.add_argument("--optuna-trials", type=int, default=16,
                    help="also tune lr at the proxy with mutransfer.tune (Optuna) with this many trials; 0: off")
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = a.device
    try:
        r = load_recipe(a.recipe)
        values = sw.parse_range(a.lr_range) if a.lr_range else None
        proxy, target = a.proxy or r.widths.proxy, a.target or r.widths.target
        cfg = sw.make_config(r, [proxy, target], values, "lr", "both", a.seeds, a.steps, a.batch_size)
        a._values = cfg.values
    except UserError as e:
        print(f"error: {e.where}: {e.message}", file=sys.stderr)
        return 2
    cache = Path(a.cache_dir or Path("runs") / r.name / "sweep")
    t0 = time.perf_counter()

    # 1. tune at the proxy (muP = SP there)
    pc, pres = _grid(r, cfg, [proxy], cfg.values, ["mup"], cache, a.workers)
    po = optimum([math.log2(v) for v in pc.values], _curve(pc, pres, "mup", proxy))
    if po.log2 is None:
        print("every proxy point diverged", file=sys.stderr)
        return 1
    tuned = {"grid": 2.0 ** po.log2}
    print(f"proxy {proxy}: LR grid + parabola: lr* = {tuned['grid']:.4g} (log2 {po.log2:.2f})"
          f"{' AT GRID EDGE' if po.at_edge else ''}")
    if a.optuna_trials:
        tuned["optuna"] = _tune_with_optuna(r, a, proxy, cache.parent / "bench-transfer")
        print(f"proxy {proxy}: mutransfer.tune ({a.optuna_trials} Optuna trials, val loss, train.steps): "
              f"lr* = {tuned['optuna']:.4g} (log2 {math.log2(tuned['optuna']):.2f})")

    out = {"recipe": a.recipe, "proxy": proxy, "target": target, "steps": cfg.steps, "batch_size": cfg.batch_size,
           "seeds": cfg.seeds, "lr_star": tuned, "proxy_grid": list(pc.values), "results": {}}
    rows = []
    for par in ("mup", "sp"):
        # 2. transfer each tuned LR
        tc, tres = _grid(r, cfg, [target], list(tuned.values()), [par], cache, a.workers)
        tcurve = dict(zip(tc.values, _curve(tc, tres, par, target)))
        # 3. direct grid at the target, refined half an octave either side of its best point
        dc, dres = _grid(r, cfg, [target], cfg.values, [par], cache, a.workers)
        curve = _curve(dc, dres, par, target)
        fin = [(y, v) for y, v in zip(curve, dc.values) if y is not None]
        if not fin:
            print(f"{par}: every direct point diverged", file=sys.stderr)
            continue
        best_v = min(fin)[1]
        fc, fres = _grid(r, cfg, [target], list(dc.values) + [best_v * 2 ** -0.5, best_v * 2 ** 0.5], [par],
                         cache, a.workers)
        fcurve = _curve(fc, fres, par, target)
        direct, direct_lr = min((y, v) for y, v in zip(fcurve, fc.values) if y is not None)
        out["results"][par] = {"direct_best_loss": direct, "direct_best_lr": direct_lr, "direct_lrs": list(fc.values),
                               "direct_losses": fcurve, "direct_seconds": _seconds(fres), "transfer": {}}
        for how, lr in tuned.items():
            t = tcurve[lr]
            gap = None if t is None else t / direct - 1
            out["results"][par]["transfer"][how] = {"lr": lr, "loss": t, "gap": gap}
            rows.append((par, how, lr, t, direct, direct_lr, gap))
    proxy_s = _seconds(pres)
    print(f"\n{'':4}{'tuned by':>9}{'lr*':>10}{'target loss @ lr*':>19}{'best direct':>13}{'at lr':>10}"
          f"{'ratio':>9}{'gap':>9}")
    for par, how, lr, t, direct, direct_lr, gap in rows:
        ratio = "-" if t is None else f"{t / direct:.4f}"
        g = "diverged" if gap is None else f"{100 * gap:+.2f}%"
        print(f"{sw.LABEL[par]:4}{how:>9}{lr:>10.3g}{'diverged' if t is None else f'{t:.4f}':>19}{direct:>13.4f}"
              f"{direct_lr:>10.3g}{ratio:>9}{g:>9}")
    mup = out["results"].get("mup")
    if mup:
        for how, d in mup["transfer"].items():
            if d["gap"] is not None:
                print(f"μP goal (within 1 %), lr* by {how}: {'met' if d['gap'] <= 0.01 else 'NOT met'} "
                      f"({100 * d['gap']:+.2f}%)")
        cost = mup["direct_seconds"] / max(proxy_s, 1e-9)
        print(f"compute: proxy grid {proxy_s:.0f} s against a direct target grid {mup['direct_seconds']:.0f} s "
              f"(ratio {cost:.1f}x; seconds as recorded per point, on a shared CPU)")
    out["proxy_seconds"] = proxy_s
    out["wall_seconds"] = time.perf_counter() - t0
    if a.json:
        sw.write_json_atomic(Path(a.json), out)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
