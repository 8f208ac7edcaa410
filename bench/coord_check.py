"""Wall time of a coordinate check: mutransfer's coord-check against microsoft/mup's get_coord_data,
on the same MLP, widths, steps, seeds, batch size and data, measured in one run; prints the ratio.

    python bench/coord_check.py [--widths 64,128,256,512] [--steps 5] [--seeds 3] [--repeats 3]

Both sides run one model at a time on CPU with one thread. Timed, for mutransfer: coord.run (probe
batch, building and parametrizing every model, training through train.train with the probe callback,
the verdict). For mup: get_coord_data (building every model, set_base_shapes, training with its hooks)
plus turning its DataFrame into per-module values at the last step, the least a user must do to read
it. mup measures during each training forward pass, i.e. at t = 0..nsteps-1, while mutransfer probes
a fixed batch at t = 0..N after N steps; so two mup baselines are timed: nsteps = N (same training
steps) and nsteps = N + 1 (same measured time points). Goal: ratio <= 1.0x against both.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mutransfer.data import vectors  # noqa: E402
from mutransfer.run import coord  # noqa: E402
from mutransfer.run.recipe import parse_recipe  # noqa: E402

IN, OUT, DEPTH = 32, 10, 3


def recipe(lr: float, batch_size: int):
    return parse_recipe({
        "name": "bench-coord", "model": {"factory": "builtin:mlp",
                                         "args": {"in_dim": IN, "out_dim": OUT, "depth": DEPTH}},
        "data": {"factory": "builtin:vectors", "args": {"dim": IN, "classes": OUT}},
        "widths": {"proxy": 64, "target": 1024},
        "train": {"optimizer": "adam", "lr": lr, "steps": 10, "batch_size": batch_size},
    })


def mup_models(widths, base_width: int):
    """The same MLP as builtin:mlp (Linear in, DEPTH-1 hidden, ReLU), with mup's MuReadout."""
    from mup import MuReadout, set_base_shapes

    class MLP(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.inp = nn.Linear(IN, width)
            self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(DEPTH - 1))
            self.act = nn.ReLU()
            self.out = MuReadout(width, OUT)

        def forward(self, x):
            h = self.act(self.inp(x))
            for layer in self.hidden:
                h = self.act(layer(h))
            return self.out(h)

    base, delta = MLP(base_width), MLP(2 * base_width)

    def lazy(w):
        def make():
            return set_base_shapes(MLP(w), base, delta=delta)
        return make
    return {w: lazy(w) for w in widths}


def run_ours(r, s):
    res = coord.run(r, s)
    return len(res.rows)


def run_mup(widths, nsteps, seeds, lr, batch_size, base_width):
    from mup.coord_check import get_coord_data

    it = vectors(batch_size=batch_size, seed=0)
    loader = [next(it) for _ in range(nsteps)]
    df = get_coord_data(mup_models(widths, base_width), loader, optimizer="adam", lr=lr, mup=True,
                        nsteps=nsteps, nseeds=seeds, cuda=False, fix_data=False, lossfn="xent", show_progress=False)
    last = df[df.t == df.t.max()].groupby(["module", "width"])["l1"].mean()
    return len(last)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--whole-process", action="store_true",
                    help="also time whole processes: `mutransfer coord-check` against a script calling get_coord_data")
    ap.add_argument("--mup-only", action="store_true", help=argparse.SUPPRESS)   # the mup child process
    a = ap.parse_args(argv)
    if a.mup_only:
        torch.set_num_threads(1)
        warnings.simplefilter("ignore")
        run_mup([int(w) for w in a.widths.split(",")], a.steps + 1, a.seeds, a.lr, a.batch_size, 64)
        return
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    widths = [int(w) for w in a.widths.split(",")]
    r = recipe(a.lr, a.batch_size)
    s = coord.resolve(r, widths=widths, steps=a.steps, seeds=a.seeds)
    jobs = {
        "mutransfer": lambda: run_ours(r, s),
        f"mup nsteps={a.steps}": lambda: run_mup(widths, a.steps, a.seeds, a.lr, a.batch_size, 64),
        f"mup nsteps={a.steps + 1}": lambda: run_mup(widths, a.steps + 1, a.seeds, a.lr, a.batch_size, 64),
    }
    for fn in jobs.values():   # warm-up: imports, data, first-call overheads
        fn()
    wall = {k: [] for k in jobs}
    cpu = {k: [] for k in jobs}
    for _ in range(a.repeats):   # interleaved, so load changes hit every side alike
        for k, fn in jobs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    print(f"MLP depth {DEPTH}, widths {widths}, steps {a.steps}, seeds {a.seeds}, batch {a.batch_size}, "
          f"adam lr {a.lr}, 1 thread, median of {a.repeats}")
    for k in jobs:
        print(f"  {k:16s} wall {statistics.median(wall[k]):7.3f} s  cpu {statistics.median(cpu[k]):7.3f} s"
              f"   (wall runs: {', '.join(f'{t:.3f}' for t in wall[k])})")
    ours_w, ours_c = statistics.median(wall["mutransfer"]), statistics.median(cpu["mutransfer"])
    for k in list(jobs)[1:]:
        print(f"in-process ratio mutransfer / {k}: wall {ours_w / statistics.median(wall[k]):.2f}x, "
              f"cpu {ours_c / statistics.median(cpu[k]):.2f}x (goal <= 1.0x)")
    if a.whole_process:
        whole(a)


def whole(a) -> None:
    """Whole processes, imports and startup included: the CLI on a recipe file (fresh cache folder each
    time) against `python bench/coord_check.py --mup-only` (mup's get_coord_data at the same measured
    time points), both with one thread, interleaved, medians."""
    import os
    import shutil
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-coord-"))
    rec = recipe(a.lr, a.batch_size).model_dump(mode="json")
    import yaml
    (tmp / "r.yaml").write_text(yaml.safe_dump(rec))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    ours = [sys.executable, "-m", "mutransfer.cli", "coord-check", "r.yaml", "--widths", a.widths, "--steps",
            str(a.steps), "--seeds", str(a.seeds), "--device", "cpu"]
    theirs = [sys.executable, str(Path(__file__).resolve()), "--mup-only", "--widths", a.widths, "--steps",
              str(a.steps), "--seeds", str(a.seeds), "--lr", str(a.lr), "--batch-size", str(a.batch_size)]
    times: dict[str, list[float]] = {"mutransfer": [], "mup": []}
    for _ in range(a.repeats):
        for k, cmd in (("mutransfer", ours), ("mup", theirs)):
            shutil.rmtree(tmp / "runs", ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, check=False)
            times[k].append(time.perf_counter() - t0)
    mt, mp = statistics.median(times["mutransfer"]), statistics.median(times["mup"])
    print(f"whole process: mutransfer coord-check {mt:.2f} s, mup script {mp:.2f} s, "
          f"ratio {mt / mp:.2f}x (goal <= 1.0x)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
