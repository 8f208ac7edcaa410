"""Shared by the CLI tests: run the command line in-process from a folder."""
from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from mutransfer.cli import app


def cli_in(folder: Path, *args):
    """`mutransfer ARGS` from `folder` (CliRunner, in-process); the result."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
