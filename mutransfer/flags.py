"""Options declared once: a command's options are a dataclass whose fields carry their flag's help and
bounds. The CLI's signature is generated from it (cli.py), the Python API takes the same names as
keyword arguments, and `validate` checks the bounds for both front doors, naming the flag.

    @dataclass(frozen=True)
    class TuneFlags:
        recipe: Path = flag(..., "recipe YAML", argument=True)
        trials: Optional[int] = flag(None, "finished trials wanted (overrides search.trials)", min=1)

Checks that several commands share live here too, one home each (`at_least`, `warmup_problem`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .errors import UserError


@dataclass(frozen=True)
class Flag:
    help: str
    min: Optional[float] = None
    max: Optional[float] = None
    cli: Optional[str] = None          # the flag's name when it is not --field-name (e.g. --json)
    argument: bool = False             # a positional argument of the command line


def flag(default: Any, help: str, *, min: Optional[float] = None, max: Optional[float] = None,
         cli: Optional[str] = None, argument: bool = False) -> Any:
    """A dataclass field declaring one option (`...` as default: required)."""
    meta = {"flag": Flag(help, min, max, cli, argument)}
    if default is ...:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of an options class that are flags, in order."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


def cli_name(f: dataclasses.Field, meta: Flag) -> str:
    if meta.argument:
        return f.name.upper()
    return meta.cli or "--" + f.name.replace("_", "-")


def at_least(value, low, where: str, high=None) -> None:
    """UserError naming `where` unless low <= value (<= high); None passes (a default is used)."""
    if value is None:
        return
    if high is not None and not low <= value <= high:
        raise UserError(where, f"must be between {low} and {high}, got {value}")
    if value < low:
        raise UserError(where, f"must be >= {low}, got {value}")


def validate(opts) -> None:
    """Every declared bound of an options object (either front door), before anything runs."""
    for f, meta in declared(type(opts)):
        if meta.min is not None or meta.max is not None:
            value = getattr(opts, f.name)
            if meta.min is None:
                if value is not None and value > meta.max:
                    raise UserError(cli_name(f, meta), f"must be <= {meta.max}, got {value}")
            else:
                at_least(value, meta.min, cli_name(f, meta), meta.max)


def warmup_problem(warmup: int, steps: int) -> Optional[str]:
    """Why a warmup does not fit in a run of `steps` steps (None when it does): the schedule would
    never leave its warmup."""
    if warmup > 0 and warmup >= steps:
        return f"warmup ({warmup}) must be below steps ({steps})"
    return None
