"""The one result cache of coord-check and sweep: finished runs kept as JSON files, so an interrupted or
repeated command reads back what is done instead of training it again.

Key scheme: `cache_key(parts)` is the SHA-256 of the canonical JSON (sorted keys) of everything
a result depends on, cut to 16 hex digits; each setup gets its own folder `<root>/<key>/`, and each
result one file in it named by the caller (a width and seed, a grid point).

Integrity check: every file carries `_cache: {key, sha256}`, the folder's key and the SHA-256 of the
result's own canonical JSON. A file is read back only when it parses, its key is the folder's and its
checksum matches its content; anything else (a file from another setup, one edited by hand, one cut
short by a full disk) reads as absent and is measured again. Files are written atomically (atomic.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from ..atomic import write_json

STAMP = "_cache"
KEY_LENGTH = 16


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def cache_key(parts: dict) -> str:
    """The key of one setup: SHA-256 of the canonical JSON of `parts`, 16 hex digits."""
    return hashlib.sha256(_canonical(parts)).hexdigest()[:KEY_LENGTH]


def checksum(data: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in data.items() if k != STAMP})).hexdigest()


class ResultCache:
    """The files of one setup: `<root>/<key>/<name>`."""

    def __init__(self, root: Path, key: str):
        self.key = key
        self.folder = Path(root) / key

    @classmethod
    def in_folder(cls, folder: Path, key: str) -> "ResultCache":
        """The cache whose folder is `folder` itself (a caller that already joined root and key)."""
        c = cls(Path(folder), key)
        c.folder = Path(folder)
        return c

    def path(self, name: str) -> Path:
        return self.folder / name

    def save(self, name: str, data: dict) -> Path:
        """Write one result (plain JSON data) with its key and checksum."""
        body = {k: v for k, v in data.items() if k != STAMP}
        return write_json(self.path(name), {**body, STAMP: {"key": self.key, "sha256": checksum(body)}},
                          indent=None)

    def load(self, name: str) -> Optional[dict]:
        """One result as saved (without its stamp), or None when absent, unreadable, from another
        setup or altered since it was written."""
        try:
            d = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict):
            return None
        stamp = d.pop(STAMP, None)
        if not isinstance(stamp, dict) or stamp.get("key") != self.key:
            return None
        return d if stamp.get("sha256") == checksum(d) else None
