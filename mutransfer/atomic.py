"""Atomic file writes: write a temporary file beside the target, then rename it over the target, so
that a reader, a resumed run or a rerun never sees half a file, even if the process dies mid-write.
The temporary name is unique per call, so concurrent writers (sweep or tune workers) cannot collide."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_via(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path), then move tmp_path onto `path`. Writers that pick a format from the file
    name (matplotlib) must name the format themselves: the temporary name ends in .tmp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_via(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data: Any, indent: int | None = 1, allow_nan: bool = True) -> Path:
    return write_text(path, json.dumps(data, indent=indent, allow_nan=allow_nan))
