"""Importing the user's code: `package.module:function` factories and `package.module:Class` optimizers.

Two goals hold at once:
  * the user's folders stay importable for the whole run: the working directory, the recipe's folder
    and the folder of the module that was found are on sys.path for good, so a factory that imports
    lazily (`def make(width): from mymodel import Net`), a module that extends sys.path itself, and
    package-relative imports all work whenever they run;
  * nothing there can replace an installed module: those folders go at the *end* of sys.path, after
    the standard library and site-packages, so a stray ./torch.py or ./matplotlib.py is never what
    `import torch` finds. The one cost, said in one line: a user module named like an installed one
    (./optuna.py as the factory) is refused with a request to rename it, never silently swapped.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..errors import UserError


def _same(a: str, b: str) -> bool:
    try:
        return os.path.realpath(a or ".") == os.path.realpath(b or ".")
    except OSError:
        return False


def add_after_installed(folder: str | Path) -> None:
    """Make `folder` importable without letting it shadow anything: append it to sys.path unless it is
    there already (a folder already on the path keeps its place: that was not our doing)."""
    f = str(Path(folder).resolve())
    if not any(_same(p, f) for p in sys.path):
        sys.path.append(f)


def user_dirs(extra: Iterable[str | Path] = ()) -> list[str]:
    """The folders user code is looked up in: the working directory, then `extra` (the recipe's)."""
    out: list[str] = []
    for d in [Path.cwd(), *extra]:
        s = str(Path(d).resolve())
        if s not in out and Path(s).is_dir():
            out.append(s)
    return out


def _local_candidate(top: str, dirs: list[str]) -> Optional[Path]:
    """./top.py or ./top/ in one of `dirs` (what the user means by the name), else None."""
    for d in dirs:
        for c in (Path(d) / f"{top}.py", Path(d) / top):
            if c.is_file() or (c.is_dir() and any(c.glob("*.py"))):
                return c
    return None


def import_module(mod_name: str, field: str, extra_dirs: Iterable[str | Path] = ()):
    """Import the user's module `mod_name` with the user folders on sys.path after the installed
    packages. UserError naming `field` when it cannot be imported or an installed module of the same
    top-level name hides the user's file."""
    dirs = user_dirs(extra_dirs)
    for d in dirs:
        add_after_installed(d)
    try:
        mod = importlib.import_module(mod_name)
    except SystemExit as e:
        raise UserError(field, f"importing module {mod_name!r} called sys.exit({e.code!r})") from None
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise UserError(field, f"cannot import module {mod_name!r} ({type(e).__name__}: {e})") from None
    top = mod_name.split(".")[0]
    local = _local_candidate(top, dirs)
    top_file = getattr(sys.modules.get(top), "__file__", None) or ""
    top_paths = [str(p) for p in getattr(sys.modules.get(top), "__path__", [])]
    if local is not None and not any(str(Path(p).resolve()).startswith(str(local.resolve()))
                                     for p in [top_file, *top_paths] if p):
        where = top_file or (top_paths[0] if top_paths else "?")
        raise UserError(field, f"{local} is hidden by the installed module {top!r} ({where}); "
                        f"rename your file (user folders come after installed packages on purpose)")
    # the found module's own folder too: a script-style `from mymodel import Net` beside it works
    f = getattr(mod, "__file__", None)
    if f and any(str(Path(f).resolve()).startswith(d + os.sep) for d in dirs):
        add_after_installed(Path(f).resolve().parent)
    return mod


def resolve_object(spec: str, field: str, extra_dirs: Iterable[str | Path] = ()) -> Any:
    """'package.module:attr.path' -> the object."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UserError(field, f"{spec!r} is not 'package.module:name'")
    mod = import_module(mod_name, field, extra_dirs)
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(field, f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve_factory(spec: str, field: str, builtins: dict[str, Callable],
                    extra_dirs: Iterable[str | Path] = ()) -> Callable:
    """'builtin:NAME' or 'package.module:function' -> the callable."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in builtins:
            raise UserError(field, f"unknown builtin {name!r}; known: {', '.join(sorted(builtins))}")
        return builtins[name]
    obj = resolve_object(spec, field, extra_dirs)
    if not callable(obj):
        raise UserError(field, f"{spec!r} is not callable")
    return obj


def accepts(fn: Callable, name: str) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    return name in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )


def register_optimizer(name: str, kind: Optional[str], args: dict) -> None:
    """Resolve `train.optimizer` when it names a class (a torch.optim class, or package.module:Class)
    and register it with its update family (engine/optimizers.py). UserError naming the field."""
    import torch

    from ..engine import optimizers

    if name in optimizers.BUILTIN:
        if kind is not None or args:
            raise UserError("train.optimizer_kind" if kind is not None else "train.optimizer_args",
                            f"applies to an optimizer named by class, not the built-in {name!r}")
        return
    if ":" in name:
        cls = resolve_object(name, "train.optimizer")
    elif name.isidentifier() and isinstance(getattr(torch.optim, name, None), type):
        cls = getattr(torch.optim, name)
    else:
        raise UserError("train.optimizer", f"unknown optimizer {name!r}: expected sgd, adam, adamw, muon, a "
                        "torch.optim class name (e.g. Adafactor) or 'package.module:Class'")
    if not callable(cls):
        raise UserError("train.optimizer", f"{name!r} is not a class")
    known = optimizers.kind_of(cls)
    kind = kind or known
    if kind is None:
        raise UserError("train.optimizer_kind", f"say the update family of {name!r}: adam (Theta(1) entries, as "
                        "Adam), sign (Lion), relative (Adafactor), sgd or orthogonal (Muon)")
    optimizers.register(optimizers.OptimizerSpec(name, cls, kind, dict(args)))
