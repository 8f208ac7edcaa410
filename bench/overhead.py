"""Step-time overhead of muP: the muP-parametrized model against the same model in plain PyTorch.

    python bench/overhead.py [--recipe recipes/gpt-pysource.yaml] [--width 256] [--steps 200]
                             [--chunk 10] [--device auto] [--threads 2] [--compile] [--same-init]

"plain" is the recipe's model built by its factory with PyTorch's default init and ONE global LR
(a single optimizer group), "mup" is `experiment.build` (per-layer init, LR, eps and weight decay in
several optimizer groups, forward pre-hooks for tied readouts). Both use the same optimizer class
and flags (fused AdamW on CUDA), the same batches and THE training loop (train.train). They are
timed interleaved in chunks of --chunk steps (A B C, B C A, C A B, ...), so drifts in machine load
and position effects hit all alike; each step's time is the gap between consecutive on_step
callbacks (the loop syncs on the loss every step).
Prints medians, quartiles and the ratio mup / plain (goal <= 1.02), plus the ratio between two
identical plain models timed in the same rotation (plain2 / plain) as the noise floor.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mutransfer.engine.hparams import HParams  # noqa: E402
from mutransfer.engine.parametrize import build_model, make_optimizer  # noqa: E402
from mutransfer.run import experiment  # noqa: E402
from mutransfer.run.recipe import load_recipe  # noqa: E402
from mutransfer.run.train import train  # noqa: E402


class StepTimes:
    def __init__(self):
        self.times: list[float] = []

    def on_start(self, state):
        self.t = time.perf_counter()

    def on_step(self, state):
        now = time.perf_counter()
        self.times.append(now - self.t)
        self.t = now


def cycle(batches):
    while True:
        yield from batches


def quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/gpt-pysource.yaml")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    ap.add_argument("--chunk", type=int, default=10, help="steps per variant before switching")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--same-init", action="store_true", help="give the muP model the plain model's initial weights")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    recipe = load_recipe(a.recipe)
    dev = experiment.resolve_device(a.device)
    t = recipe.train
    hp = HParams.from_train(t)

    mup = experiment.build(recipe, a.width, hp, device=dev)
    def plain():
        torch.manual_seed(t.seed)
        m = build_model(experiment.model_factory(recipe), a.width, recipe.model.args, dev)
        groups = [{"params": [p for p in m.parameters() if p.requires_grad], "weight_decay": hp.weight_decay}]
        return m, make_optimizer(groups, t.optimizer, hp, torch.device(dev))

    plain_model, plain_opt = plain()
    if a.same_init:   # isolate the optimizer-group / hook cost from any effect of the weights' values
        mup.model.load_state_dict(plain_model.state_dict())
    # "plain2" is a second, identical plain model in the same rotation: plain2 / plain is the noise floor
    variants = {"mup": (mup.model, mup.optimizer), "plain": (plain_model, plain_opt), "plain2": plain()}

    it = experiment.data_stream(recipe, "train", t.seed)
    batches = [next(it) for _ in range(8)]
    timers = {k: StepTimes() for k in variants}
    done = {k: 0 for k in variants}
    total = a.warmup + a.steps
    print(f"{recipe.name} width {a.width} on {dev}: {len(mup.optimizer.param_groups)} muP optimizer groups vs 1; "
          f"{sum(p.numel() for p in plain_model.parameters()):,} parameters; {a.steps} timed steps each")
    fwds = {k: (torch.compile(m) if a.compile else None) for k, (m, _) in variants.items()}
    names, rnd = list(variants), 0
    while min(done.values()) < total:
        order = names[rnd % len(names):] + names[:rnd % len(names)]   # rotate who goes first each round
        rnd += 1
        for name in order:
            model, opt = variants[name]
            n = min(a.chunk, total - done[name])
            if n <= 0:
                continue
            cfg = experiment.train_config(recipe, dev, steps=done[name] + n, start_step=done[name],
                                          log_every=10**9, schedule="constant", warmup=0)
            train(model, opt, cycle(batches), cfg, callbacks=[timers[name]], forward=fwds[name])
            done[name] += n
    med = {}
    for name in variants:
        xs = timers[name].times[-a.steps:]
        q1, m, q3 = quartiles(xs)
        med[name] = m
        print(f"{name:>6}: median {1e3 * m:8.3f} ms/step  (quartiles {1e3 * q1:.3f} .. {1e3 * q3:.3f}, n={len(xs)})")
    print(f"noise floor: plain2 / plain (identical models) = {med['plain2'] / med['plain']:.4f}")
    print(f"overhead ratio mup / plain = {med['mup'] / med['plain']:.4f}  (goal <= 1.02)")


if __name__ == "__main__":
    main()
