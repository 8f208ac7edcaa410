"""`--log tensorboard|wandb|csv` (repeatable) for scale, tune and sweep: the same numbers the
progress bar and metrics.jsonl show, where people look. Everything lands inside the run folder:
`<run>/metrics.csv`, `<run>/tb/` (TensorBoard event files), `<run>/wandb/` (a W&B run, offline
unless WANDB_MODE says otherwise; `wandb sync` uploads it later). tensorboard and wandb are optional
extras (`pip install "mutransfer[tensorboard]"`, `"mutransfer[wandb]"`): asked for without them, the
command stops with one line before any work.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

KINDS = ("tensorboard", "wandb", "csv")


def check_kinds(kinds: Optional[list[str]]) -> list[str]:
    """Validate --log values and that their packages import (before any work)."""
    out = []
    for k in kinds or []:
        if k not in KINDS:
            raise UserError("--log", f"unknown logger {k!r}; expected one of {', '.join(KINDS)}")
        if k == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise UserError("--log", "tensorboard is not installed: pip install 'mutransfer[tensorboard]'") from None
        if k == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UserError("--log", "wandb is not installed: pip install 'mutransfer[wandb]'") from None
            check_wandb_env()
        if k not in out:
            out.append(k)
    return out


WANDB_MODES = ("offline", "online", "disabled", "dryrun", "run", "shared")


def check_wandb_env() -> None:
    """WANDB_MODE must be a mode wandb knows; online needs an API key (else wandb would ask for one
    or fail after the run folder was written)."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode not in WANDB_MODES:
        raise UserError("WANDB_MODE", f"{mode!r} is not a wandb mode; expected one of {', '.join(WANDB_MODES)} "
                                      "(unset it for offline runs)")
    if mode in ("online", "run", "shared") and not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
        raise UserError("WANDB_MODE", f"{mode} needs a W&B API key (WANDB_API_KEY or `wandb login`); "
                                      "or unset WANDB_MODE to log offline and `wandb sync` later")


def _netrc_has_wandb() -> bool:
    import netrc
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return base in hosts or any("wandb" in h for h in hosts)


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


class Loggers:
    """One object for every logger asked for; `log(step, values)`, `close()`. Also a train() callback
    (`on_step`) that logs at every log interval and validation."""

    def __init__(self, kinds: list[str], folder: Path, name: str, config: Optional[dict] = None):
        self.kinds, self.folder = list(kinds), Path(folder)
        self._csv = self._csv_file = self._csv_keys = None
        self._tb = self._wandb = None
        if not self.kinds:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in self.kinds:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.folder / "tb"))
        if "wandb" in self.kinds:
            import wandb
            (self.folder / "wandb").mkdir(exist_ok=True)
            try:
                self._wandb = wandb.init(dir=str(self.folder), project="mutransfer", name=name, config=config or {},
                                         mode=os.environ.get("WANDB_MODE", "offline"), reinit="finish_previous")
            except Exception as e:  # noqa: BLE001 - wandb's settings and network errors
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise UserError("--log", f"wandb could not start a run: {type(e).__name__}: {first}") from None
        if "csv" in self.kinds:
            self._csv_path = self.folder / "metrics.csv"

    def log(self, step: int, values: dict[str, Any]) -> None:
        vals = {k: v for k, v in ((k, _num(v)) for k, v in values.items()) if v is not None}
        if not vals:
            return
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(vals, step=step)
        if "csv" in self.kinds:
            new = not self._csv_path.exists()
            with open(self._csv_path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "key", "value"])
                for k, v in vals.items():
                    w.writerow([step, k, repr(v)])

    def on_step(self, state) -> None:
        every = state.config.log_every
        if state.step % every == 0 or state.val_loss is not None or state.step == state.config.steps:
            self.log(state.step, {"train/loss": state.loss, "train/lr_factor": state.lr, "val/loss": state.val_loss,
                                  "perf/samples_per_s": state.samples_per_s, "perf/tokens_per_s": state.tokens_per_s,
                                  **{f"perf/{k}": v for k, v in state.extra.items()},
                                  **{f"train/{k}": v for k, v in getattr(state, "aux", {}).items()}})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def on_end(self, state) -> None:
        self.close()
