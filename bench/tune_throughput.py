"""Trials per hour of `mutransfer tune`, side by side in one run: one trial at a time
(`--parallel-trials 1`), batched trials (`--parallel-trials B` for each B given), and `--workers K`,
on CPU; and on the GPU when there is one (proxy width --gpu-width, default 128: one at a time vs the
automatic group size). Whole processes (imports, data, study, outputs included), interleaved, medians.

Every run tunes the same recipe with `search.pruner: none` and a fixed sampler seed, so each mode
trains the same number of full trials and the figures compare throughput, not pruning luck. A second
table measures the training step itself in-process: milliseconds per trial-step of a group of B
trials (fixed values, no evaluation), the ratio batching can give at best.

    python bench/tune_throughput.py [--recipe recipes/quickstart.yaml] [--trials 16] [--batched 4,8]
                                    [--workers 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_recipe(src: Path, folder: Path, trials: int) -> Path:
    r = yaml.safe_load(src.read_text())
    r.setdefault("search", {}).update(pruner="none", sampler_seed=0, trials=trials)
    out = folder / src.name
    out.write_text(yaml.safe_dump(r))
    return out


def one(recipe: Path, trials: int, flags: list[str], folder: Path) -> float:
    shutil.rmtree(folder / "runs", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)          # the tool chooses threads from the CPUs it may use
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mutransfer.cli", "tune", str(recipe), "--trials", str(trials),
                          *flags], cwd=folder, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"tune {' '.join(flags)} failed ({out.returncode}): {out.stderr[-800:]}")
    return time.perf_counter() - t0


def step_table(recipe_path: Path, groups: list[int], device: str, width: int | None, steps: int = 40) -> None:
    """ms per trial-step of a group of B trials through THE loop (no evaluation)."""
    import torch

    from mutransfer.engine.hparams import HParams
    from mutransfer.run import experiment
    from mutransfer.run.batched_trials import build_batch
    from mutransfer.run.recipe import load_recipe
    from mutransfer.run.train import train
    from mutransfer.run.trial_batch import SlotData, make_optimizer
    from mutransfer.threads import configure

    configure()
    r = load_recipe(recipe_path)
    w = width or r.widths.proxy
    hp = HParams.from_train(r.train)
    cfg = experiment.train_config(r, device=device, steps=steps, eval_every=0)
    res = {}
    for b in groups:
        times = []
        for _ in range(2):
            batch = build_batch(r, w, [hp] * b, [r.train.seed] * b, device, True)
            opt = make_optimizer(batch, r.train.optimizer)
            data = SlotData(batch, lambda s: experiment.data_stream(r, "train", s))
            cfg.steps = 5
            train(batch, opt, data, cfg)                   # warm-up (allocator, kernels)
            cfg.steps = steps + 5
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            cfg.start_step = 5
            train(batch, opt, data, cfg)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            cfg.start_step = 0
            times.append((time.perf_counter() - t0) / steps / b)
        res[b] = min(times)
    print(f"  training step in-process ({device}, width {w}, {torch.get_num_threads()} threads):")
    for b, t in res.items():
        print(f"    group of {b:3d}: {1e3 * t:7.3f} ms per trial-step, {res[groups[0]] / t:5.2f}x one at a time")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--batched", default="4,8", help="group sizes to compare with one at a time")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu-width", type=int, default=128)
    ap.add_argument("--no-steps", dest="steps", action="store_false", help="skip the in-process step table")
    a = ap.parse_args(argv)
    import torch

    folder = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    recipe = bench_recipe(Path(a.recipe).resolve(), folder, a.trials)
    groups = [int(b) for b in a.batched.split(",") if b.strip()]
    modes = {"--parallel-trials 1": ["--device", "cpu", "--parallel-trials", "1"]}
    for b in groups:
        modes[f"--parallel-trials {b}"] = ["--device", "cpu", "--parallel-trials", str(b)]
    modes[f"--workers {a.workers}"] = ["--device", "cpu", "--parallel-trials", "1", "--workers", str(a.workers)]
    gpu = torch.cuda.is_available()
    if gpu:
        modes["cuda --parallel-trials 1"] = ["--device", "cuda", "--parallel-trials", "1", "--width", str(a.gpu_width)]
        modes["cuda (automatic group)"] = ["--device", "cuda", "--width", str(a.gpu_width)]
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(a.repeats):
        for k, flags in modes.items():
            times[k].append(one(recipe, a.trials, flags, folder))
    shutil.rmtree(folder, ignore_errors=True)
    print(f"{Path(a.recipe).name}: {a.trials} trials (pruner none, full length), {os.cpu_count()} CPUs"
          + (f", GPU {torch.cuda.get_device_name()}" if gpu else "") + f"; median of {a.repeats} whole processes")
    for k, ts in times.items():
        base = statistics.median(times["cuda --parallel-trials 1" if k.startswith("cuda") else "--parallel-trials 1"])
        m = statistics.median(ts)
        print(f"  {k:26s} {m:7.1f} s  {3600 * a.trials / m:8.0f} trials/hour  {base / m:5.2f}x one at a time "
              f"(runs: {', '.join(f'{t:.1f}' for t in ts)})")
    if a.steps:
        step_table(Path(a.recipe), [1, *groups, 16], "cpu", None)
        if gpu:
            step_table(Path(a.recipe), [1, 4, 16, 64], "cuda", a.gpu_width, steps=100)


if __name__ == "__main__":
    main()
