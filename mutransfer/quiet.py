"""Third-party warnings, collected: while a command runs, warnings raised by installed packages' code
(warnings.warn from files under site-packages) and records of their loggers (transformers') are counted, not
printed; at the end one line says how many came from where and that --verbose shows them. The
tool's own warnings, the user's code's and the tool's output are never held back."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

_PKG = str(Path(__file__).resolve().parent)
LOGGERS = ("transformers", "datasets", "huggingface_hub", "torch")

_active: list["_Collector"] = []


def _package_of(filename: str):
    """The installed package a file belongs to (None: not an installed package's: the user's, ours)."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = parts.index(marker)
            if i + 1 < len(parts):
                return parts[i + 1].split(".")[0]
    return None


class _Counting(logging.Handler):
    def __init__(self, counts: Counter, name: str):
        super().__init__(logging.WARNING)
        self.counts, self.name = counts, name

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[self.name] += 1


class _Collector:
    def __init__(self):
        self.counts: Counter = Counter()
        self.saved: dict[str, tuple] = {}

    def adopt(self, name: str) -> None:
        """Route logger `name`'s records to the counter (its handlers set aside until the end)."""
        lg = logging.getLogger(name)
        if name not in self.saved:
            self.saved[name] = ([], lg.propagate)
            lg.addHandler(_Counting(self.counts, name))
            lg.propagate = False
        for h in list(lg.handlers):       # including one the library added since (on its import)
            if not isinstance(h, _Counting):
                self.saved[name][0].append(h)
                lg.removeHandler(h)

    def restore(self) -> None:
        for name, (handlers, prop) in self.saved.items():
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                lg.removeHandler(h)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate = prop


def adopt_logger(name: str) -> None:
    """Called by the code that imports a chatty library (models/hf.py): count its logger too. The
    library may install its own handler on import, so this is called after importing it."""
    if _active:
        _active[-1].adopt(name)


@contextlib.contextmanager
def collected(verbose: bool = False, out=None) -> Iterator[Counter]:
    """Count third-party warnings inside; print one summary line at the end (to `out`, stderr)."""
    if verbose:
        yield Counter()
        return
    col = _Collector()
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        pkg = _package_of(filename)
        if pkg is None or pkg == "mutransfer" or str(Path(filename).resolve()).startswith(_PKG):
            shown(message, category, filename, lineno, file, line)      # ours and the user's: always shown
        else:
            col.counts[pkg] += 1

    _active.append(col)
    for name in LOGGERS:
        if name in sys.modules or name == "transformers":
            col.adopt(name)
    warnings.showwarning = show
    try:
        yield col.counts
    finally:
        warnings.showwarning = shown
        col.restore()
        _active.remove(col)
        if col.counts:
            what = ", ".join(f"{n} from {k}" for k, n in col.counts.most_common())
            total = sum(col.counts.values())
            print(f"note: {total} third-party warning{'s' if total > 1 else ''} ({what}); --verbose shows them",
                  file=out or sys.stderr)
