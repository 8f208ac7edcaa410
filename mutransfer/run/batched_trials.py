"""A group of Optuna trials trained at once: every (trial, seed) is a slot of one TrialBatch, trained by
THE loop (train.train). One trial alone is a group of one: the same code, the same optimizer
(batched_optim.py), so `--parallel-trials 1` and batched tuning cannot drift apart.

Per trial, exactly as one trial trained alone:
  - its value is the final validation loss, mean over its seeds;
  - it reports the mean validation loss of its seeds every report_every of its steps; the pruner ends
    all its slots (they leave the stack: a pruned trial costs nothing afterwards);
  - a seed that diverges (NaN/inf, or a loss above divergence_factor x its first) ends the trial with
    the penalty divergence_factor x the worst finite initial validation loss of its seeds.

Refill (`ask`): when trials end, new ones take their places at the stack's next evaluation point (the
live slots are then all at a multiple of report_every, so the stack stays in phase and evaluates
together); a new trial starts from its own step 0 with its own data stream and optimizer state.

Models that cannot be vectorised (torch.func.vmap refuses them: data-dependent control flow, .item(),
custom autograd functions without a vmap rule) run their slots one after another in each step
(TrialBatch(vectorise=False)); `probe()` says which, and why, before the first group.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..engine.hparams import HParams
from . import experiment
from .recipe import Recipe
from .slot_optim import trial_optimizer
from .train import State, evaluate, train
from .trial_batch import SlotData, SlotSpec, TrialBatch, make_optimizer

PENALTY_FALLBACK = 1.0e4       # a diverged trial's value when even its initial validation loss is not finite


@dataclass
class Outcome:
    """What a trial came to: "complete" with `value` (a penalty when diverged) or "pruned"."""
    state: str
    value: Optional[float] = None
    message: str = ""
    attrs: dict = field(default_factory=dict)


def report_every(recipe: Recipe) -> int:
    return recipe.search.report_every or recipe.train.eval_every or max(1, recipe.train.steps // 5)


def precision(device: str) -> str:
    """What the trials compute in (recorded on every trial): bf16 autocast on CUDA, else fp32."""
    return "bf16-autocast" if torch.device(device).type == "cuda" else "fp32"


class _Reports:
    """Callback: initial validation losses per slot; every evaluation, each trial's mean over its live
    seeds -> trial.report() at its own step, and the pruner's verdict; a diverged seed ends its
    trial's other seeds. A trial whose slots have all ended is handed to `done` at once (its outcome).
    With `refill`, trials that ended make room for new ones (on_refill)."""

    def __init__(self, group: "_Group"):
        self.g = group
        self.pruned: dict[int, str] = {}
        self.results: dict[int, Outcome] = {}
        self.active: list[int] = list(range(len(group.trials)))    # trials still training (no result yet)

    def on_start(self, state: State) -> None:
        self.g.record_init_values(state, list(state.model.live))

    def on_eval(self, state: State) -> None:
        for t in self.active:
            trial, sl = self.g.trials[t], [state.slots[i] for i in self.g.slots_of[t]]
            if any(s.ended is not None for s in sl):
                continue
            vals = [s.val_loss for s in sl]
            if any(v is None for v in vals):
                continue
            mean, step = sum(vals) / len(vals), sl[0].steps
            trial.report(mean, step)
            if trial.should_prune():
                self.pruned[t] = f"validation loss {mean:.4g} at step {step}"
                for s in sl:
                    s.ended = "pruned"

    def on_step(self, state: State) -> None:
        for t in list(self.active):
            sl = [state.slots[i] for i in self.g.slots_of[t]]
            if any(s.ended == "diverged" for s in sl):
                for s in sl:
                    if s.ended is None:
                        s.ended, s.reason = "stopped", "another seed of its trial diverged"
            if all(s.ended is not None for s in sl):
                self.finish(t, state)

    def on_refill(self, state: State) -> None:
        self.g.refill(state, self)

    def finish(self, t: int, state: State) -> None:
        self.active.remove(t)
        self.results[t] = self.g.outcome(t, state, self)
        if self.g.done is not None:
            self.g.done(t, self.results[t])


def slot_specs(recipe: Recipe, width: int, hps: Sequence[HParams], seeds: Sequence[int],
               device: str) -> list[SlotSpec]:
    """The slots of these (values, seed) pairs at `width`, the proxy being `width` itself (a plain model
    there, as `scale` rebuilds it from proxy_width)."""
    return [SlotSpec(experiment.build(recipe, width, hp, device=device, seed=seed, base_width=width,
                                      base_depth=experiment.depth_of(recipe), with_optimizer=False), hp, seed)
            for hp, seed in zip(hps, seeds)]


def build_batch(recipe: Recipe, width: int, hps: Sequence[HParams], seeds: Sequence[int], device: str,
                vectorise: bool) -> TrialBatch:
    """The TrialBatch of these (values, seed) slots."""
    return TrialBatch(slot_specs(recipe, width, hps, seeds, device), recipe.model.output, vectorise=vectorise)


class _Group:
    """The trials of one run_group call, their slots (one per seed) and how they end."""

    def __init__(self, recipe: Recipe, width: int, device: str, vectorise: bool, val: list, done, ask, capacity: int):
        self.r, self.width, self.device, self.vectorise, self.val = recipe, width, device, vectorise, val
        self.done, self.ask, self.capacity = done, ask, capacity
        self.seeds = [recipe.train.seed + s for s in range(recipe.search.seeds)]
        self.trials: list = []
        self.slots_of: list[list[int]] = []
        self.started: list[float] = []
        self.init_val: dict[int, float] = {}
        self.batch: Optional[TrialBatch] = None
        self.opt = None
        self.every = report_every(recipe)

    def specs(self, hps: Sequence[HParams]) -> list[SlotSpec]:
        """A slot per (trial, seed), a trial's seeds side by side."""
        return slot_specs(self.r, self.width, [hp for hp in hps for _ in self.seeds], self.seeds * len(hps),
                          self.device)

    def register(self, trials: Sequence, first_slot: int) -> None:
        k = len(self.seeds)
        for j, trial in enumerate(trials):
            self.trials.append(trial)
            self.slots_of.append(list(range(first_slot + j * k, first_slot + (j + 1) * k)))
            self.started.append(time.perf_counter())

    def record_init_values(self, state: State, slot_ids: list[int]) -> None:
        """Validation loss at initialisation of these slots (a diverged trial's penalty is a multiple)."""
        c = state.config
        amp = c.amp if c.amp is not None else torch.device(c.device).type == "cuda"
        values = evaluate(self.batch, self.val, c.loss, c.device, amp)
        for i, v in zip(self.batch.live, values):
            if i in slot_ids:
                self.init_val[i] = v

    def refill(self, state: State, rep: _Reports) -> None:
        """Ask for trials where others ended, while every live slot is at an evaluation point of its
        own (so the stack's slots stay in phase: they evaluate on the same loop iterations)."""
        if self.ask is None:
            return
        live = [i for i in self.batch.live if state.slots[i].ended is None]
        if any(state.slots[i].steps % self.every for i in live):
            return
        free = self.capacity - len(rep.active)
        new = self.ask(free) if free > 0 else []
        if not new:
            return
        trials, hps = [t for t, _ in new], [h for _, h in new]
        ids = self.batch.add(self.specs(hps), self.opt, at=state.step)
        rep.active += range(len(self.trials), len(self.trials) + len(trials))
        self.register(trials, ids[0])
        self.record_init_values(state, ids)

    def outcome(self, t: int, state: State, rep: _Reports) -> Outcome:
        r, slots = self.r, self.slots_of[t]
        sl = [state.slots[i] for i in slots]
        attrs: dict[str, Any] = {"steps_run": sum(s.steps for s in sl),
                                 "seconds": round(time.perf_counter() - self.started[t], 3),
                                 "parallel_trials": self.capacity, "device": self.device,
                                 "precision": precision(self.device)}
        bad = [(i, s) for i, s in zip(slots, sl) if s.ended == "diverged"]
        if bad:
            finite = [v for v in (self.init_val.get(i, math.nan) for i in slots) if math.isfinite(v)]
            attrs.update(diverged=True, reason=f"seed {self.batch.seeds[bad[0][0]]}: {bad[0][1].reason}")
            return Outcome("complete", float(r.search.divergence_factor * max(finite)) if finite
                           else PENALTY_FALLBACK, attrs=attrs)
        if t in rep.pruned:
            return Outcome("pruned", message=rep.pruned[t], attrs=attrs)
        finals = [s.val_loss for s in sl]
        attrs.update(diverged=False, seed_values=finals)
        return Outcome("complete", sum(finals) / len(finals), attrs=attrs)


def run_group(recipe: Recipe, width: int, device: str, trials: Sequence, hps: Sequence[HParams], val: list,
              vectorise: bool = True, done: Optional[Callable[[int, Outcome], None]] = None,
              ask: Optional[Callable[[int], list]] = None) -> list[Outcome]:
    """Train these trials (optuna.Trial or FixedTrial, with their values `hps`) together; one Outcome
    each, in the order the trials were trained. Reports and pruning go through each trial as it
    trains; `done(i, outcome)` is called for trial i as soon as it ends (pruned or diverged ones
    before the others finish). `ask(k)`, when given, is called as trials end for up to k more
    (trial, values) pairs, trained in the freed places (a group of len(trials) places): each new
    trial starts from its own step 0, data and optimizer state, as it would alone."""
    r = recipe
    g = _Group(r, width, device, vectorise, val, done, ask, capacity=len(trials))
    g.batch = TrialBatch(g.specs(hps), r.model.output, vectorise=vectorise)
    g.register(trials, 0)
    g.opt = trial_optimizer(g.batch, r.train.optimizer, make_optimizer)   # a named class: one per slot
    cfg = experiment.train_config(r, device=device, eval_every=g.every, divergence_factor=r.search.divergence_factor)
    rep = _Reports(g)
    data = SlotData(g.batch, lambda s: experiment.data_stream(r, "train", s))
    state = train(g.batch, g.opt, data, cfg, val, [rep])
    for t in list(rep.active):
        rep.finish(t, state)
    return [rep.results[t] for t in range(len(g.trials))]


def probe(recipe: Recipe, width: int, device: str) -> Optional[str]:
    """None when two slots of this model run under vmap (a forward and backward in training mode and
    a forward in eval mode, on the first batch); else the reason, in one line."""
    hp = HParams.from_train(recipe.train)
    if recipe.train.aux_losses:
        return "train.aux_losses: auxiliary losses are added one model at a time"
    try:
        batch = build_batch(recipe, width, [hp, hp], [recipe.train.seed] * 2, device, vectorise=True)
        x, y = experiment.first_batch(experiment.data_stream(recipe, "train", recipe.train.seed))
        x, y = x.to(device), y.to(device)
        amp = torch.device(device).type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = batch(x)
        batch.slot_losses(recipe.loss, out, y).sum().backward()
        batch.eval()                       # validation runs the model in eval mode: that path too
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            batch(x)
    except Exception as e:  # noqa: BLE001 - vmap's refusals come as many exception types
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:200]}"
    return None


def _numel(recipe: Recipe, width: int) -> int:
    return sum(math.prod(p.shape) for p in experiment.shapes_for(recipe, width, width).params.values())


def slot_bytes(recipe: Recipe, width: int) -> int:
    """Memory of one slot beyond the shared data: fp32 weights, gradients, optimizer state (2 moments),
    plus activations of one step, estimated as 4 bytes x (tokens of a batch) x width x 16 per block."""
    shapes = experiment.shapes_for(recipe, width, width)
    numel = _numel(recipe, width)
    x, _ = experiment.first_batch(experiment.data_stream(recipe, "train", recipe.train.seed))
    tokens = x.numel()
    blocks = max(1, len(shapes.branches.modules) // 2) if shapes.branches else 4
    return numel * 4 * 4 + tokens * width * 16 * 4 * blocks


def step_flops(recipe: Recipe, width: int) -> Optional[tuple[float, float]]:
    """FLOPs of one trial's training step (forward and backward, every micro-batch) and of one
    validation batch (forward), counted on the meta device; None when the model cannot run there."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..engine.outputs import select
    from ..engine.shapes import build_meta
    from .train import loss_fn

    try:
        x, y = experiment.first_batch(experiment.data_stream(recipe, "train", recipe.train.seed))
        model = build_meta(experiment.model_factory(recipe), width, experiment.model_args(recipe))
        xm, ym = x.to("meta"), y.to("meta")
        with FlopCounterMode(display=False) as fc:
            loss_fn(recipe.loss, select(model(xm), recipe.model.output), ym).backward()
        train_f = fc.get_total_flops() * recipe.train.grad_accum
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            loss_fn(recipe.loss, select(model(xm), recipe.model.output), ym)
        return float(train_f), float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - a model that cannot run on meta: its size stays unknown
        return None


CPU_WORK = 1e8               # work per stacked CPU step that hides a step's Python overhead (FLOP-equivalents)
CPU_FLOPS_PER_PARAM = 500     # an optimizer step's memory traffic per parameter, in FLOP-equivalents
CPU_MAX_GROUP = 32


def choose_parallel(recipe: Recipe, width: int, device: str, trials: int, explicit: Optional[int] = None) -> int:
    """Trials per group. --parallel-trials wins. Otherwise at most half the trials (a second group
    then asks with what the first taught the sampler), and:
      GPU: as many as fit in half its free memory (at most 64); one proxy trial leaves a GPU idle.
      CPU: by the model's size. A small proxy's step is bound by Python overhead (~0.3 ms), which
           stacking trials amortises until a step does ~100 MFLOP-equivalents of work; a
           larger one is bound by arithmetic (its matmuls run near the cores' peak) or by the
           optimizer's memory traffic (~500 FLOP-equivalents per parameter: an embedding-heavy MLP of
           9 MFLOP but 156k parameters gains nothing), and trains one at a time. Measured on 2 cores
           (bench/tune_throughput.py, per trial-step against one at a time): an MLP of 0.6 MFLOP and
           3k parameters 9.9x in groups of 32; 3.9 MFLOP / 11k: 5.8x; 14 MFLOP / 38k: 2.1x with 8;
           53 MFLOP / 142k, the 156k-parameter MLP and the 380 MFLOP quick-start GPT: 0.85-1.1x.
    Memory bounds every choice. On CPU the choice depends on the recipe, not on the machine's cores
    (memory aside), so a study with a sampler_seed draws the same trials on another machine."""
    if explicit:
        return max(1, min(explicit, trials))
    cap = max(1, (trials + 1) // 2)
    per = max(1, slot_bytes(recipe, width) * recipe.search.seeds)
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        return max(1, min(64, cap, int(free * 0.5 // per)))
    flops = step_flops(recipe, width)
    if flops is None:
        return 1
    work = (flops[0] + CPU_FLOPS_PER_PARAM * _numel(recipe, width)) * recipe.search.seeds
    want = int(CPU_WORK // max(1.0, work))
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        have = 4 << 30
    return max(1, min(CPU_MAX_GROUP, cap, want, int(have * 0.25 // per)))
