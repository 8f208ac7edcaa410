"""One width policy for every command's output: on a terminal, the terminal's width; piped or logged,
a fixed 160 columns so tables keep their columns. Text lines (paths, messages) never wrap: they are
printed with soft_wrap, so a path can be copied from a log whole."""
from __future__ import annotations

from rich.console import Console

PIPED_WIDTH = 160


def make_console(stderr: bool = False, **kw) -> Console:
    c = Console(stderr=stderr, soft_wrap=True, **kw)
    if not c.is_terminal:
        c = Console(stderr=stderr, soft_wrap=True, width=PIPED_WIDTH, **kw)
    return c
