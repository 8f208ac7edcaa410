"""The coordinate check from Python, for users with their own model and loop (like microsoft/mup's
get_coord_data): the same probe, attention tracer, spectral check and verdict as the CLI.

    res = mutransfer.coord_check(my_factory, [64, 128, 256, 512], batches=batches, lr=1e-2)
    assert res.verdict == "ok", res.to_json()

`batches` is a list of (inputs, targets); the first batch's inputs are the probe. Without
`train_step`, training goes through mutransfer's loop with `loss`; with it, `train_step(model,
optimizer, batch)` is called once per step and does the forward, backward and optimizer step.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

from ..engine.hparams import HParams
from ..engine.parametrize import parametrize
from ..engine.plan import MUP
from ..engine.shapes import infer_shapes
from ..run.coord_measure import ROOT, Settings, loop_steps, measure_model, user_steps
from ..run.coord_verdict import Result, matrix_fans, verdict
from ..run.train import TrainConfig


def coord_check(factory: Callable, widths: list[int], *, batches: list, steps: int = 5, seeds: int = 1,
                lr: float = 1e-3, optimizer: str = "adamw", hparams: Optional[HParams] = None,
                base_width: Optional[int] = None, args: Optional[dict[str, Any]] = None,
                loss: str = "cross_entropy", output: Any = None, parametrization: str = MUP,
                train_step: Optional[Callable] = None) -> Result:
    """Train `factory(width=w, **args)` (parametrized relative to base_width, default the smallest
    width) for `steps` steps at every width and seed, probe every step, and judge. Returns a Result
    (`.verdict` "ok" | "blowup" | "inconclusive", `.exit_code`, `.rows`, `.findings`, `.to_json()`)."""
    widths = sorted(set(widths))
    if len(widths) < 2:
        raise ValueError("coord_check needs at least 2 widths")
    if not batches:
        raise ValueError("coord_check needs at least one batch")
    args = args or {}
    base = base_width or widths[0]
    hp = (hparams or HParams()).with_values({"lr": lr})
    x = batches[0][0]
    s = Settings(tuple(widths), steps, seeds, float(lr), optimizer, parametrization, int(x.shape[0]))
    runs = []
    for w in widths:
        for k in range(seeds):
            model, opt, plan = parametrize(factory, w, base, hp, optimizer, args, seed=k,
                                           parametrization=parametrization, example=x)
            data = itertools.cycle(batches)
            fit = (loop_steps(model, opt, data, TrainConfig(steps=steps, loss=loss, log_every=steps, output=output))
                   if train_step is None else user_steps(model, opt, data, steps, train_step))
            runs.append(measure_model(model, plan, x, output, w, k, fit))
    fans = matrix_fans({w: infer_shapes(factory, args, base, w, warn=False, example=x) for w in widths})
    return verdict(runs, s, fans, ROOT)
