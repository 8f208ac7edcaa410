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


def one_line(res, code: int = 2, *needles) -> str:
    """A CLI result that failed with `code` in one line (no traceback) holding every needle; the line."""
    assert res.exit_code == code, res.output
    line = res.output.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for n in needles:
        assert n in line, line
    return line


def subprocess_env() -> dict:
    """The environment for a `python -m mutransfer.cli` subprocess: one thread, this checkout and tests/
    importable."""
    here = Path(__file__).resolve().parent
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{here.parent}{os.pathsep}{here}")
