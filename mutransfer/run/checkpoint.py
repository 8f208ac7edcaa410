"""Checkpoints that make an interrupted run indistinguishable from an uninterrupted one.

A checkpoint DIR/checkpoints/step-NNNNNNNN.pt holds the full (unsharded) model and optimizer state
keyed by parameter name (torch.distributed.checkpoint's state-dict API, so DDP, FSDP2 and single
process read each other's files), the step (the LR schedule is a pure function of it), every rank's
RNG states and data position, and a fingerprint of what was trained. It is written to a temporary
file in the same folder and renamed, so a kill at any moment leaves either the old set or the new.

Data position: a stream that has `state_dict()`/`load_state_dict()` (a stateful loader) is saved and
restored as such; any other iterator is re-created with the same seed and advanced past the batches
already consumed, which is exact because a recipe's data factory must be determined by its seed.
"""
from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..atomic import write_via
from ..signals import sigint_ignored
from . import distributed as D

NAME = re.compile(r"^step-(\d{8})\.pt$")


class Resumable:
    """An iterator that counts what it hands out, so its position can be saved and restored."""

    def __init__(self, it: Iterator):
        self.it = it
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.it)
        self.position += 1
        return b

    def state_dict(self) -> dict:
        d: dict[str, Any] = {"position": self.position}
        if hasattr(self.it, "state_dict") and hasattr(self.it, "load_state_dict"):
            d["inner"] = self.it.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        if "inner" in d and hasattr(self.it, "load_state_dict"):
            self.it.load_state_dict(d["inner"])
        else:
            for _ in range(d["position"] - self.position):
                next(self.it)
        self.position = d["position"]


def rng_state() -> dict:
    """Every RNG a training step may draw from, as plain Python data (lists of ints: safe for
    all_gather_object and for torch.load(weights_only=True))."""
    d: dict[str, Any] = {"torch": torch.get_rng_state().tolist(), "python": _plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        d["cuda"] = torch.cuda.get_rng_state().tolist()
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        d["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return d


def set_rng_state(d: dict) -> None:
    torch.set_rng_state(torch.tensor(d["torch"], dtype=torch.uint8))
    random.setstate(_tuples(d["python"]))
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(d["cuda"], dtype=torch.uint8))
    if "numpy" in d:
        import numpy as np

        name, keys, pos, has_gauss, gauss = d["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, tuple) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def path_for(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.match(p.name))


def latest(folder: Path) -> Optional[Path]:
    c = checkpoints(folder)
    return c[-1] if c else None


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file. A failed write (a full disk, a quota) is an OSError naming
    `path` (torch reports it as a RuntimeError of its zip writer); the previous checkpoints stay."""
    def save(tmp: str) -> None:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())   # on disk before the rename makes it the newest checkpoint
        except RuntimeError as e:
            raise _write_error(e, Path(tmp), path) from None
    write_via(path, save)


def _write_error(e: RuntimeError, tmp: Path, path: Path) -> BaseException:
    """torch's zip writer turns ENOSPC/EDQUOT/EIO into RuntimeError: give back the OSError it was."""
    import errno
    import shutil
    text = str(e)
    try:
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        free = None
    full = free is not None and free < (1 << 20)
    if full or any(k in text for k in ("file write failed", "unexpected pos", "No space left", "Disk quota")):
        code = errno.EDQUOT if "quota" in text.lower() else (errno.ENOSPC if full or "space" in text else errno.EIO)
        return OSError(code, os.strerror(code), str(path))
    return e


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _full_state(model, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore(ckpt: dict, model, optimizer, data: Resumable, d: D.Dist) -> None:
    """Load model, optimizer, this rank's RNG and data position from a checkpoint dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    mine = ckpt["ranks"][d.rank]
    data.load_state_dict(mine["data"])
    set_rng_state(mine["rng"])


class Checkpointer:
    """Callback: a checkpoint every `every` steps (0: none during training) and at the end of a run
    that did not diverge; keeps the newest `keep`. Every rank takes part (FSDP2 gathers shards);
    rank 0 writes."""

    def __init__(self, folder: Path, every: int, data: Resumable, d: D.Dist, meta: dict, keep: int = 2):
        self.folder, self.every, self.data, self.d = Path(folder), every, data, d
        self.meta, self.keep = meta, keep
        self.saved_step: Optional[int] = None
        self.first_loss: Optional[float] = None

    def on_start(self, state) -> None:
        self.saved_step = state.step
        if self.first_loss is not None and state.first_loss is None:
            state.first_loss = self.first_loss

    def on_step(self, state) -> None:
        if self.every and state.step % self.every == 0 and not state.diverged:
            self.save(state)

    def on_end(self, state) -> None:
        if not state.diverged and state.step != self.saved_step:
            self.save(state)

    def save(self, state) -> Path:
        msd, osd = _full_state(state.model, state.optimizer)
        ranks = D.gather_objects({"rng": rng_state(), "data": self.data.state_dict()}, self.d)
        path = path_for(self.folder, state.step)
        if self.d.main:
            atomic_save({"format": 1, "step": state.step, "model": msd, "optimizer": osd, "ranks": ranks,
                         "world_size": self.d.world, "first_loss": state.first_loss, **self.meta}, path)
            for old in checkpoints(self.folder)[:-self.keep]:
                old.unlink()
        D.barrier(self.d)
        self.saved_step = state.step
        return path


class StopOnSignal:
    """Callback: the first SIGINT/SIGTERM asks the run to stop at the end of the current step (so
    the Checkpointer saves a consistent state); a second one interrupts at once. Ranks agree on the
    step to stop at."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, d: D.Dist):
        self.d = d
        self.requested = False
        self.old: dict = {}

    def _handler(self, signum, frame):
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.requested = True

    def _restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}

    def on_start(self, state) -> None:
        try:
            for s in self.SIGNALS:
                if s == signal.SIGINT and sigint_ignored():
                    continue      # a background job: the shell asked for Ctrl-C to be ignored
                self.old[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._restore()

    def on_step(self, state) -> None:
        if D.any_rank(self.requested, self.d):
            self.requested = True
            state.stop = state.stop or "interrupted"

    def on_end(self, state) -> None:
        self._restore()
