"""Trials per hour of `mutransfer tune` as whole processes, side by side in one run: one worker against
`--workers K` on the same recipe, trial count and machine, interleaved, medians. The baseline the
batched-trials work (issue 14) must beat; batched trials are not implemented yet.

    python bench/tune_throughput.py [--recipe recipes/quickstart.yaml] [--trials 12] [--workers 2] [--repeats 2]
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

REPO = Path(__file__).resolve().parents[1]


def one(recipe: Path, trials: int, workers: int, folder: Path) -> float:
    shutil.rmtree(folder / "runs", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)          # the tool chooses threads from the CPUs it may use
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mutransfer.cli", "tune", str(recipe), "--trials", str(trials),
                          "--workers", str(workers), "--device", "cpu"], cwd=folder, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"tune failed ({out.returncode}): {out.stderr[-500:]}")
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    times: dict[int, list[float]] = {1: [], a.workers: []}
    for _ in range(a.repeats):
        for k in times:
            times[k].append(one(Path(a.recipe).resolve(), a.trials, k, folder))
    shutil.rmtree(folder, ignore_errors=True)
    print(f"{Path(a.recipe).name}: {a.trials} trials, {os.cpu_count()} CPUs, median of {a.repeats} whole processes")
    base = statistics.median(times[1])
    for k, ts in times.items():
        m = statistics.median(ts)
        print(f"  --workers {k}: {m:6.1f} s, {3600 * a.trials / m:7.0f} trials/hour, {base / m:.2f}x one worker "
              f"(runs: {', '.join(f'{t:.1f}' for t in ts)})")


if __name__ == "__main__":
    main()
