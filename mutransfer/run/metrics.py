"""What a run reports while it trains: DIR/metrics.jsonl, a live rich progress bar, and MFU.

MFU = model FLOPs per sample x samples/s / (GPUs x the GPU's dense bf16 peak). Model FLOPs are those
of `scale --dry-run` (torch's FlopCounterMode on meta tensors: every matmul forward and backward, so
6 x matmul parameters per token plus attention's 12 x layers x width x seq_len, the full score matrix
as in PaLM's accounting even though causal attention computes half of it)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..atomic import write_text
from ..console import hms

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),          # SXM / "H100 80GB HBM3"
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)


def peak_flops(device: str) -> Optional[float]:
    """The dense bf16 peak of this CUDA device (env MUTRANSFER_PEAK_FLOPS overrides); None if unknown/CPU."""
    env = os.environ.get("MUTRANSFER_PEAK_FLOPS")
    if env:
        return float(env)
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peak in PEAK_BF16:
        if key in name:
            return peak
    return None


def mfu(flops_per_sample: Optional[float], samples_per_s: float, peak: Optional[float], world: int = 1) -> Optional[float]:
    if not flops_per_sample or not peak or samples_per_s <= 0:
        return None
    return flops_per_sample * samples_per_s / (peak * world)


class MetricsFile:
    """Callback: one JSON object per logged step (every log_every steps, at validations and at the
    end) appended to `path`, with step, loss, lr, samples/s, tokens/s, val_loss and mfu when known.
    On resume, lines after the resumed step are dropped first, so the file reads as one run."""

    def __init__(self, path: Path, base_lr: float, flops_per_sample: Optional[float] = None,
                 peak: Optional[float] = None, world: int = 1, resume_step: int = 0):
        self.path, self.base_lr = Path(path), base_lr
        self.flops, self.peak, self.world = flops_per_sample, peak, world
        self.resume_step = resume_step
        self.f = None
        self.t0 = time.perf_counter()
        self.last: dict = {}
        self.rates: list[dict] = []   # throughput and MFU of every logging interval of this process

    def typical(self) -> dict:
        """Median samples/s, tokens/s and MFU over the logging intervals (robust to the first
        interval's compile and warm-up time)."""
        out = {}
        for k in ("samples_per_s", "tokens_per_s", "mfu"):
            xs = sorted(r[k] for r in self.rates if r.get(k) is not None)
            if xs:
                out[k] = xs[len(xs) // 2]
        return out

    def on_start(self, state) -> None:
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        write_text(self.path, "".join(k + "\n" for k in kept))
        self.f = self.path.open("a", buffering=1)

    def on_step(self, state) -> None:
        c = state.config
        if not (state.step % c.log_every == 0 or state.step == c.steps or state.val_loss is not None or state.stop):
            return
        rec = {"step": state.step, "loss": state.loss, "lr": self.base_lr * state.lr}
        rec.update({f"aux/{k}": v for k, v in state.aux.items()})
        if state.val_loss is not None:
            rec["val_loss"] = state.val_loss
        rec["samples_per_s"] = round(state.samples_per_s, 3)
        if state.tokens_per_s != state.samples_per_s:
            rec["tokens_per_s"] = round(state.tokens_per_s, 3)
        m = mfu(self.flops, state.samples_per_s, self.peak, self.world)
        if m is not None:
            rec["mfu"] = round(m, 4)
        rec["elapsed_s"] = round(time.perf_counter() - self.t0, 3)
        self.last = rec
        if state.step % c.log_every == 0 or state.step == c.steps:   # intervals whose throughput is fresh
            self.rates.append({k: rec.get(k) for k in ("samples_per_s", "tokens_per_s", "mfu")})
        self.f.write(json.dumps(rec) + "\n")

    def on_end(self, state) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class LiveProgress:
    """Callback: a rich progress bar with the latest loss, val loss, throughput and MFU."""

    def __init__(self, console: Console, total: int, start: int, metrics: Optional[MetricsFile] = None):
        self.console, self.total, self.start, self.metrics = console, total, start, metrics
        self.progress: Optional[Progress] = None
        self.val: Optional[float] = None

    def on_start(self, state) -> None:
        self.plain = not self.console.is_terminal    # piped or logged: a plain line per log interval
        self.t0, self.s0 = time.perf_counter(), state.step
        if self.plain:
            return
        self.progress = Progress(
            TextColumn("[bold]scale"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("scale", total=self.total, completed=self.start, info="")

    def on_step(self, state) -> None:
        if state.val_loss is not None:
            self.val = state.val_loss
        info = f"loss {state.loss:.4f}"
        if self.val is not None:
            info += f" val {self.val:.4f}"
        if state.tokens_per_s and state.tokens_per_s != state.samples_per_s:
            info += f" {state.tokens_per_s:,.0f} tok/s"
        elif state.samples_per_s:
            info += f" {state.samples_per_s:,.1f} samples/s"
        m = (self.metrics.last or {}).get("mfu") if self.metrics else None
        if m is not None:
            info += f" MFU {100 * m:.1f}%"
        if self.plain:
            every = state.config.log_every
            if state.step % every == 0 or state.step == self.total or state.val_loss is not None:
                done = state.step - self.s0
                el = time.perf_counter() - self.t0
                eta = el / done * (self.total - state.step) if done else float("nan")
                self.console.print(f"step {state.step}/{self.total} {info} elapsed {hms(el)} eta {hms(eta)}",
                                   highlight=False, soft_wrap=True)
            return
        self.progress.update(self.task, completed=state.step, info=info)

    def on_end(self, state) -> None:
        if self.progress is not None:
            self.progress.stop()
