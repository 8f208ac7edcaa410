"""Atomic file writes: write a temporary file beside the target, then rename it over the target, so
that a reader, a resumed run or a rerun never sees half a file, even if the process dies mid-write.
The temporary name is unique per call, so concurrent writers (sweep or tune workers) cannot collide.
Files get the mode a plain open() would give them (0666 less the umask; an existing file keeps its
mode), not mkstemp's 0600. Temporaries left by a killed process (`.NAME.*.tmp`) are removed by
`clean_stale_temporaries` when a command starts on the folder again."""
from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def write_via(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path), then move tmp_path onto `path`. Writers that pick a format from the file
    name (matplotlib) must name the format themselves: the temporary name ends in .tmp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


TMP_SUFFIX = ".tmp"


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def clean_stale_temporaries(folder: str | Path, older_than_s: float = 0.0) -> list[Path]:
    """Remove `.NAME.*.tmp` files that an atomic write left behind when its process was killed."""
    folder = Path(folder)
    gone = []
    if not folder.is_dir():
        return gone
    now = time.time()
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        try:
            if p.is_file() and now - p.stat().st_mtime >= older_than_s:
                p.unlink()
                gone.append(p)
        except OSError:
            pass
    return gone


def write_text(path: str | Path, text: str) -> Path:
    return write_via(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data: Any, indent: int | None = 1, allow_nan: bool = True) -> Path:
    return write_text(path, json.dumps(data, indent=indent, allow_nan=allow_nan))
