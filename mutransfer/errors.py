"""The one exception type for mistakes a user can make (recipe, flags, factories, data).

The CLI turns it into a single line `error: <where>: <message>` and exit code 2. Library callers can
catch it too; `where` is a field path such as `train.lr` or a file name.
"""
from __future__ import annotations


class UserError(Exception):
    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)
