"""One guarded path for every output file: mutransfer overwrites only a file it wrote itself for the
same purpose (it carries a marker), and never the recipe, a study storage or anything else.

Markers: YAML and JSON outputs carry `written_by: "mutransfer <purpose>"`; PNGs carry the same text
in their `Software` metadata; checkpoints are recognised by their folder. A folder given as a file
path, a file given as a folder, an unwritable parent: one line naming the flag, before any work.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserError


def marker(purpose: str) -> str:
    return f"mutransfer {purpose}"


def _carries(path: Path, purpose: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return marker(purpose).encode() in head


def check_output(path: Optional[str | Path], flag: str, purpose: str, protect: Iterable[Optional[Path]] = (),
                 suffix: Optional[str] = None) -> Optional[Path]:
    """Validate an output path before any work. `protect`: files this run reads (the recipe, the
    study storage) that must never be replaced."""
    if path is None:
        return None
    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        raise UserError(flag, f"{p} must end in {suffix}")
    for q in protect:
        if q is not None and p.exists() and Path(q).exists() and os.path.samefile(p, q):
            raise UserError(flag, f"{p} is this run's {'recipe' if str(q).endswith(('.yaml', '.yml')) else 'input'}"
                            "; refusing to overwrite it")
    if p.is_dir():
        raise UserError(flag, f"{p} is a directory, not a file")
    if p.exists() and not _carries(p, purpose):
        raise UserError(flag, f"{p} exists and is not a {purpose} file written by mutransfer; "
                        "refusing to overwrite it (remove it or choose another path)")
    _writable(p.parent if str(p.parent) else Path("."), flag)
    return p


def _writable(folder: Path, flag: str) -> None:
    """The nearest existing folder at or above `folder` must be a directory we can write to."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(flag, f"{probe} is not a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(flag, f"cannot write to {probe}")


def check_out_dir(path: str | Path, flag: str) -> Path:
    """An output folder: not a file, creatable and writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(flag, f"{p} is a file, not a directory")
    _writable(p, flag)
    return p
