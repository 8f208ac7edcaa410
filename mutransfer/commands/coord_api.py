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

from ..run.coord import Probe, Recorder, Result, Run, Settings, verdict
from ..run.coord_spectral import SpectralRecorder
from ..engine.hparams import HParams
from ..engine.parametrize import parametrize
from ..engine.plan import MUP
from ..engine.shapes import infer_shapes
from ..run.train import TrainConfig, train


def _changes(factory, args, base, widths, example) -> list[tuple[str, int, int]]:
    branch: dict[str, list] = {}
    for w in widths:
        for n, p in infer_shapes(factory, args, base, w, warn=False, example=example).params.items():
            if p.role in ("input", "hidden", "output"):
                branch.setdefault(n, []).append((w, p.fan_out >= p.fan_in))
    return [(n, a[0], b[0]) for n, seq in branch.items() for a, b in zip(seq, seq[1:]) if a[1] != b[1]]


def coord_check(factory: Callable, widths: list[int], *, batches: list, steps: int = 5, seeds: int = 1,
                lr: float = 1e-3, optimizer: str = "adamw", hparams: Optional[HParams] = None,
                base_width: Optional[int] = None, args: Optional[dict[str, Any]] = None,
                loss: str = "cross_entropy", output: Any = None, parametrization: str = MUP,
                train_step: Optional[Callable] = None) -> Result:
    """Train `factory(width=w, **args)` (parametrized relative to base_width, default the smallest
    width) for `steps` steps at every width and seed, probe every step, and judge. Returns a Result
    (`.verdict` "ok" | "blowup", `.rows`, `.findings`, `.to_json()`)."""
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
            rec, spec = Recorder(Probe(model, x, output)), SpectralRecorder(model, plan)
            cbs = [rec] + ([spec] if k == 0 else [])
            data = itertools.cycle(batches)
            if train_step is None:
                state = train(model, opt, data, TrainConfig(steps=steps, loss=loss, log_every=steps, output=output),
                              callbacks=cbs)
                diverged, reason = state.diverged, state.reason
            else:
                for cb in cbs:
                    cb.on_start(None)
                model.train()
                for _ in range(steps):
                    train_step(model, opt, next(data))
                    rec.on_step(None)
                if k == 0:
                    spec.on_end(None)
                diverged, reason = False, ""
            runs.append(Run(w, k, rec.records, diverged, reason, dict(rec.probe.static),
                            dict(spec.values) if k == 0 else {}))
    return verdict(runs, s, _changes(factory, args, base, widths, x))
