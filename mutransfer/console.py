"""One width policy for every command's output: on a terminal, the terminal's width; piped or logged,
a fixed 160 columns so tables keep their columns. Text lines (paths, messages) never wrap: they are
printed with soft_wrap, so a path can be copied from a log whole."""
from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import ProgressColumn
from rich.text import Text

PIPED_WIDTH = 160


def hms(seconds: float) -> str:
    """H:MM:SS (whole seconds, rounded down), "-:--:--" for an unknown (NaN) time: every elapsed time
    and ETA the commands print."""
    if seconds != seconds:
        return "-:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_bar(label: str, console: Optional[Console] = None, disable: bool = False):
    """The bar long work shows: LABEL, bar, done/total, elapsed, remaining, the current item."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.description}"))
    return Progress(*cols, console=console, disable=disable, transient=False)


def make_console(stderr: bool = False, **kw) -> Console:
    c = Console(stderr=stderr, soft_wrap=True, **kw)
    if not c.is_terminal:
        c = Console(stderr=stderr, soft_wrap=True, width=PIPED_WIDTH, **kw)
    return c


class PlainLines:
    """Progress for logs: when `console` is not a terminal, one plain line per unit of work finished
    (what, done/total, elapsed, ETA from the mean time per unit); on a terminal it prints nothing (the
    rich bar shows the same)."""

    def __init__(self, console: Console, what: str, total: int, done: int = 0):
        import time
        self.console, self.what, self.total, self.start_done = console, what, total, done
        self.t0 = time.perf_counter()
        self.last = done

    def update(self, done: int, info: str = "") -> None:
        import time
        if self.console.is_terminal or done == self.last:
            return
        self.last = done
        el = time.perf_counter() - self.t0
        n = done - self.start_done
        eta = el / n * max(0, self.total - done) if n > 0 else float("nan")
        self.console.print(f"{self.what} {done}/{self.total}" + (f" {info}" if info else "")
                           + f" elapsed {hms(el)} eta {hms(eta)}", highlight=False, soft_wrap=True)


class MeanEta(ProgressColumn):
    """Time left from the mean time per finished unit since the start: rich's own estimate needs
    several units within its 30 s window and shows -:--:-- when a unit (a trial) takes longer.
    A task's field `start_done` counts the units that were done before this run started."""

    def render(self, task):
        done = task.completed - task.fields.get("start_done", 0)
        if not task.elapsed or done <= 0 or task.total is None:
            return Text(hms(float("nan")))
        return Text(hms(task.elapsed / done * max(0.0, task.total - task.completed)))


# ---------------------------------------------------------------- user text ------------------------------

import re as _re

from .errors import mask_secrets

_CONTROL = _re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")


def clean(value) -> str:
    """A user's value as it may be shown: passwords masked, control characters (ANSI escapes, carriage
    returns, bells) written as \\xNN so they cannot redraw or colour the terminal."""
    text = mask_secrets(str(value))
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def literal(value) -> str:
    """A user's value for a rich markup string: cleaned, with its brackets escaped so that `x[/]`,
    `[fc]*.weight` or `'mutransfer[wandb]'` print as written. (A trailing backslash stays single: put
    no markup tag right after a literal.)"""
    import re
    text = clean(value)
    return re.sub(r"(\\*)\[(?=[a-zA-Z#/@])", lambda m: m.group(1) * 2 + "\\[", text)


def print_error(console: Console, where: str, message: str) -> None:
    """The one line of a user error: `error: <where>: <message>`, both printed literally."""
    from rich.text import Text
    line = Text("error:", style="red")
    line.append(" " + clean(f"{where}: {message}" if where else message))
    console.print(line, highlight=False, soft_wrap=True)
