"""The one training loop. tune, scale, coord-check and sweep all train through `train()`.

It owns: the LR schedule (warmup, then constant / cosine / linear decay, applied to every group's
`initial_lr` so the muP ratios between groups are kept), gradient accumulation and clipping, bf16
autocast on GPU, periodic validation, divergence detection and callbacks. Commands add behaviour
(pruning, coordinate measurements, checkpoints, metrics files) through callbacks, never a private loop.

Under torch.distributed (DDP or FSDP2 set up by the caller, see distributed.py) each step's loss is
averaged over ranks (so every rank takes the same stop decision) and throughput is the global one.

Batched trials (trial_batch.TrialBatch: several trials stacked in one module) go through this same
loop: the loss is one per slot, and each slot has its own step count (its LR schedule and evaluation
points follow it), first loss, divergence, validation loss and end (state.slots; a callback ends
slot i by setting state.slots[i].ended, e.g. "pruned"; a slot that reaches config.steps ends
"finished"). Ended slots leave the stack after the step; an `on_refill` callback may then add new
ones (TrialBatch.add); training stops when no slot is left.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.outputs import OutputError, select
from ..errors import UserError
from .trial_batch import TrialBatch

LOSSES = ("cross_entropy", "mse")


def loss_fn(name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "cross_entropy":
        return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))
    if name == "mse":
        return F.mse_loss(output.float(), target.float().reshape(output.shape))
    raise ValueError(f"unknown loss {name!r}")


def lr_factor(step: int, steps: int, schedule: str = "constant", warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of every group's initial LR at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup)
    t = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - t)
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class TrainConfig:
    steps: int
    loss: str = "cross_entropy"
    schedule: str = "constant"
    warmup: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = None
    grad_accum: int = 1
    eval_every: int = 0            # 0: only at the end (if a val source is given)
    eval_batches: int = 4
    log_every: int = 10
    device: str = "cpu"
    amp: Optional[bool] = None     # None: bf16 autocast on CUDA only
    divergence_factor: Optional[float] = None   # stop when loss > factor * first loss
    start_step: int = 0            # resume: steps already done (the data iterator is advanced by the caller)
    tf32: bool = True              # allow TF32 matmuls/convolutions on CUDA
    output: Any = None             # which part of the model's return value is the prediction (outputs.py)
    # auxiliary losses: key / attribute of the model's return value -> coefficient, added to the
    # objective (an MoE's load-balancing `aux_loss`, a router z-loss); validation scores the loss alone
    aux_losses: dict = field(default_factory=dict)


@dataclass
class Slot:
    """One slot of a TrialBatch: its latest losses, and why it ended (None while it trains)."""
    loss: float = float("nan")
    val_loss: Optional[float] = None      # set on the steps it was evaluated, else None
    first_loss: Optional[float] = None
    ended: Optional[str] = None           # "diverged", "pruned", ... (set by the loop or a callback)
    reason: str = ""
    steps: int = 0                        # optimizer steps it took


@dataclass
class State:
    """What callbacks see. `stop = True` (or a string reason) ends training after this step."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    step: int = 0                  # optimizer steps done
    loss: float = float("nan")
    val_loss: Optional[float] = None
    lr: float = 0.0
    first_loss: Optional[float] = None
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    stop: Any = False
    diverged: bool = False
    reason: str = ""
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    aux: dict = field(default_factory=dict)         # auxiliary losses of the last step (unweighted), by name
    slots: list[Slot] = field(default_factory=list)   # batched trials only: one per original slot


class Callback(Protocol):
    def on_start(self, state: State) -> None: ...
    def on_step(self, state: State) -> None: ...
    def on_eval(self, state: State) -> None: ...
    def on_end(self, state: State) -> None: ...


def _call(callbacks, hook: str, state: State) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


def _next_batch(data: Iterator, step: int):
    """The next training batch; a finite or failing iterator is the user's data, named as such."""
    try:
        b = next(data)
    except StopIteration:
        raise UserError("data", f"the training iterator ended after step {step} (it must be infinite)") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's iterator may raise anything
        raise UserError("data", f"the training iterator failed at step {step + 1}: {type(e).__name__}: {e}") from None
    if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(torch.is_tensor(t) for t in b)):
        raise UserError("data", f"batch {step + 1} is not a pair of tensors (inputs, targets)")
    return b


def _to(batch, device):
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, loss: str, device: str, amp: bool, output: Any = None):
    """Mean loss over `batches`: a float, or for a TrialBatch a list with one per live slot (every slot
    sees the same validation batches)."""
    was = model.training
    model.eval()
    trials = isinstance(model, TrialBatch)
    shared = trials and model.per_slot_input
    if trials:
        model.per_slot_input = False
    total, n = 0.0, 0
    try:
        for batch in batches:
            x, y = _to(batch, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model(x) if trials else select(model(x), output)
            total = total + (model.slot_losses(loss, out, y) if trials else float(loss_fn(loss, out, y)))
            n += 1
    finally:
        model.train(was)
        if trials:
            model.per_slot_input = shared
    if trials:
        return (total / max(1, n)).tolist() if n else [0.0] * model.slots()
    return total / max(1, n)


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _global_mean(x: torch.Tensor, world: int) -> float:
    """The mean over ranks of a scalar (one all-reduce); the value itself when not distributed."""
    if world > 1:
        x = x.detach().clone()
        torch.distributed.all_reduce(x)
        x = x / world
    return float(x)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterator,
    config: TrainConfig,
    val_batches: Optional[list] = None,
    callbacks: Iterable = (),
    forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
    no_sync: Optional[Callable[[], ContextManager]] = None,
) -> State:
    """Train for config.steps optimizer steps (from config.start_step). Returns the final State.

    `forward` replaces model(x) (e.g. a torch.compile'd module); `val_batches` is a fixed list of
    validation batches. `no_sync()` (e.g. DDP's `model.no_sync`) wraps every micro-batch but the last
    of a step, so gradients are all-reduced once per step. A NaN/inf loss, or a loss above
    divergence_factor x the first, stops training with state.diverged set (before the optimizer
    step: the parameters stay those of the last good step). A TrialBatch takes the same path, each
    slot judged on its own (the module's docstring)."""
    callbacks = list(callbacks)
    cuda = torch.device(config.device).type == "cuda"
    amp = config.amp if config.amp is not None else cuda
    if cuda and config.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fwd = forward if forward is not None else model
    world = _world()
    state = State(model, optimizer, config, step=config.start_step)
    run = (_Stack if isinstance(model, TrialBatch) else _Single)(state, world, amp)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    model.train()
    _call(callbacks, "on_start", state)
    pace = _Pace(world)
    while run.going() and not state.stop:
        t_step = time.perf_counter()
        f = run.lr_factor()
        for g in optimizer.param_groups:
            # a factor of 1 keeps the initial LR as it is (for batched trials a whole map, not re-made)
            g["lr"] = g["initial_lr"] if (not torch.is_tensor(f) and f == 1.0) else g["initial_lr"] * f
        state.lr = f if not torch.is_tensor(f) else float(f.mean())
        acc = None
        for i in range(config.grad_accum):
            x, y = _to(_next_batch(data, state.step), config.device)
            last = i == config.grad_accum - 1
            with (contextlib.nullcontext() if last or no_sync is None else no_sync()):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out = fwd(x)
                loss = run.loss(out, y, i)             # this micro-batch's share of the step's objective
                loss.sum().backward()          # slots' losses are independent: each gets its own gradient
            acc = loss.detach() if acc is None else acc + loss.detach()
            pace.count(x, y, config.loss)
        if not run.step(acc):                  # a NaN/inf loss: stopped before the optimizer step
            break
        pace.tick(state, t_step)
        run.evaluate(val_batches, callbacks)
        _call(callbacks, "on_step", state)
        run.settle(callbacks)
    _call(callbacks, "on_end", state)
    return state


def _aux_terms(raw: Any, config: TrainConfig, record: dict, first: bool) -> torch.Tensor:
    """sum of coefficient x auxiliary loss over config.aux_losses, each read from the model's return
    value by its key; `record` gets each term's unweighted value (mean over the step's micro-batches)."""
    total = 0.0
    for name, coef in config.aux_losses.items():
        try:
            a = select(raw, name)
        except OutputError as e:
            raise UserError(f"train.aux_losses.{name}", f"not in the model's output: {e} (a transformers MoE "
                            "returns aux_loss with output_router_logits: true in model.args)") from None
        a = a.float().mean()
        v = float(a.detach()) / config.grad_accum
        record[name] = (0.0 if first else record.get(name, 0.0)) + v
        total = total + coef * a
    return total


def divergence(unit, total: float, steps: int, factor: Optional[float]) -> Optional[str]:
    """Why a run (a State, or one slot of a TrialBatch) whose loss at its step `steps` is `total` has
    diverged; None when it has not. Its first finite loss is recorded here (unit.first_loss)."""
    if not math.isfinite(total):
        return f"loss became {total} at step {steps}"
    if unit.first_loss is None:
        unit.first_loss = total
    elif factor and steps > 1 and total > factor * unit.first_loss:
        return f"loss {total:.4g} exceeds {factor}x its first value {unit.first_loss:.4g}"
    return None


def _eval_due(steps: int, config: TrainConfig) -> bool:
    return bool(config.eval_every and steps % config.eval_every == 0) or steps == config.steps


class _Pace:
    """Throughput over the training steps (not validation or callbacks) since the last log line."""

    def __init__(self, world: int):
        self.world, self.busy, self.samples, self.tokens = world, 0.0, 0, 0

    def count(self, x: torch.Tensor, y: torch.Tensor, loss: str) -> None:
        self.samples += x.shape[0]
        self.tokens += y.numel() if y.dim() >= 2 and loss == "cross_entropy" else x.shape[0]

    def tick(self, state: State, t_step: float) -> None:
        self.busy += time.perf_counter() - t_step
        c = state.config
        if state.step % c.log_every == 0 or state.step == c.steps:
            dt = max(self.busy, 1e-9)
            state.samples_per_s, state.tokens_per_s = self.samples * self.world / dt, self.tokens * self.world / dt
            self.busy, self.samples, self.tokens = 0.0, 0, 0


class _Single:
    """One model: one loss a step (averaged over ranks), training stops when it diverges."""

    def __init__(self, state: State, world: int, amp: bool):
        self.state, self.c, self.world, self.amp = state, state.config, world, amp
        self.params = [p for g in state.optimizer.param_groups for p in g["params"]]

    def going(self) -> bool:
        return self.state.step < self.c.steps

    def lr_factor(self):
        c = self.c
        return lr_factor(self.state.step, c.steps, c.schedule, c.warmup, c.min_lr_ratio)

    def loss(self, out, y: torch.Tensor, micro: int) -> torch.Tensor:
        c = self.c
        loss = loss_fn(c.loss, select(out, c.output), y) / c.grad_accum
        if c.aux_losses:
            loss = loss + _aux_terms(out, c, self.state.aux, micro == 0) / c.grad_accum
        return loss

    def step(self, acc: torch.Tensor) -> bool:
        state, opt = self.state, self.state.optimizer
        total = _global_mean(acc, self.world)
        if self.c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.c.grad_clip)
        why = divergence(state, total, state.step + 1, self.c.divergence_factor)
        state.loss = total
        if why and not math.isfinite(total):
            opt.zero_grad(set_to_none=True)
            state.diverged, state.stop, state.reason = True, True, why
            return False
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        if why:
            state.diverged, state.stop, state.reason = True, True, why
        return True

    def evaluate(self, val_batches: Optional[list], callbacks: list) -> None:
        state, c = self.state, self.c
        state.val_loss = None
        if val_batches and not state.diverged and _eval_due(state.step, c):
            state.val_loss = evaluate(state.model, val_batches, c.loss, c.device, self.amp, c.output)
            if not math.isfinite(state.val_loss):
                state.diverged, state.stop = True, True
                state.reason = f"validation loss became {state.val_loss} at step {state.step}"
            _call(callbacks, "on_eval", state)

    def settle(self, callbacks: list) -> None:
        pass


class _Stack:
    """A TrialBatch: one loss per slot, and each slot its own step count (its LR schedule and
    evaluation points follow it), first loss, divergence, validation loss and end."""

    def __init__(self, state: State, world: int, amp: bool):
        self.state, self.c, self.amp = state, state.config, amp
        self.trials: TrialBatch = state.model
        state.slots = [Slot() for _ in self.trials.seeds]

    def going(self) -> bool:
        return True                    # until no slot is left (settle sets state.stop)

    def lr_factor(self):
        """Each live slot's schedule factor at its own step: one number while they agree, else a column."""
        c, slots = self.c, self.state.slots
        fs = [lr_factor(slots[i].steps, c.steps, c.schedule, c.warmup, c.min_lr_ratio) for i in self.trials.live]
        if all(f == fs[0] for f in fs):
            return fs[0]
        return torch.tensor(fs, dtype=torch.float32, device=self.trials.flat.device).view(-1, 1)

    def loss(self, out, y: torch.Tensor, micro: int) -> torch.Tensor:
        # each slot selected its prediction; auxiliary losses are a single model's (config.aux_losses)
        return self.trials.slot_losses(self.c.loss, select(out, None), y) / self.c.grad_accum

    def step(self, acc: torch.Tensor) -> bool:
        """One optimizer step of every live slot; then each slot's loss, first loss and divergence."""
        state, opt = self.state, self.state.optimizer
        totals = acc.float().tolist()
        if self.c.grad_clip:
            self.trials.clip_grad_norm_(self.c.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        finite = []
        for slot_id, total in zip(self.trials.live, totals):
            sl = state.slots[slot_id]
            sl.steps += 1
            sl.loss, sl.val_loss = total, None
            why = divergence(sl, total, sl.steps, self.c.divergence_factor)
            if why:
                sl.ended, sl.reason = "diverged", why
            if math.isfinite(total):
                finite.append(total)
        state.loss = sum(finite) / len(finite) if finite else float("nan")
        if state.first_loss is None:
            state.first_loss = state.loss
        return True

    def evaluate(self, val_batches: Optional[list], callbacks: list) -> None:
        """Validation losses of the slots due (every live slot is evaluated; the others keep None);
        then the slots that reached config.steps are "finished"."""
        state, c, live = self.state, self.c, self.trials.live
        due = [i for i in live if state.slots[i].ended is None and _eval_due(state.slots[i].steps, c)]
        if val_batches and due:
            values = evaluate(self.trials, val_batches, c.loss, c.device, self.amp)
            good = []
            for slot_id, v in zip(live, values):
                sl = state.slots[slot_id]
                if slot_id not in due:
                    continue
                sl.val_loss = v
                if not math.isfinite(v):
                    sl.ended, sl.reason = "diverged", f"validation loss became {v} at step {sl.steps}"
                else:
                    good.append(v)
            state.val_loss = min(good) if good else None
            _call(callbacks, "on_eval", state)
        for i in live:
            if state.slots[i].ended is None and state.slots[i].steps >= c.steps:
                state.slots[i].ended = "finished"

    def settle(self, callbacks: list) -> None:
        """Let `on_refill` callbacks add slots (TrialBatch.add) where others ended; drop the slots that
        ended from the stack (and the optimizer); stop when none is left."""
        state, trials = self.state, self.trials
        _call(callbacks, "on_refill", state)
        state.slots += [Slot() for _ in range(len(trials.seeds) - len(state.slots))]
        keep = [i for i in trials.live if state.slots[i].ended is None]
        if not keep:                      # the last rows stay (their values can be read after training)
            state.stop = "every slot ended"
        elif len(keep) < len(trials.live):
            trials.retain(keep, state.optimizer)
