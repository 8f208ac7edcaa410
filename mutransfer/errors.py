"""The one exception type for mistakes a user can make (recipe, flags, factories, data).

The CLI turns it into a single line `error: <where>: <message>` and exit code 2. Library callers can
catch it too; `where` is a field path such as `train.lr` or a file name.
"""
from __future__ import annotations

import re

_URL_SECRET = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@'\"]*:)(?P<pw>[^\s@/'\"]*)(?P<at>@)")

_KEY_SECRET = re.compile(r"((?:password|passwd|pwd)\s*=\s*)[^\s&;'\"]+", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """Every URL's password shown as ***: `postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`."""
    text = _URL_SECRET.sub(lambda m: m.group("head") + "***" + m.group("at"), str(text))
    return _KEY_SECRET.sub(lambda m: m.group(1) + "***", text)     # a driver's DSN: password=...


class UserError(Exception):
    """`where` and `message` never hold a URL's password (masked here, whoever raises)."""

    def __init__(self, where: str, message: str):
        self.where = mask_secrets(where)
        self.message = mask_secrets(message)
        super().__init__(f"{self.where}: {self.message}" if self.where else self.message)
