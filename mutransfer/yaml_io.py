"""The hardened YAML loader every file the user hands us goes through (recipes, hparams files).

A SafeLoader that refuses duplicate keys, alias bombs and deep nesting; each failure is a UserError
naming the file and line. A foundation module: it knows nothing of recipes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

MAX_NODES = 100_000        # nodes after expanding aliases: anchors are convenient, a "billion laughs" bomb is not
MAX_DEPTH = 100


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in one mapping, documents that expand (through aliases)
    to more than MAX_NODES nodes (the memory bomb), and nesting deeper than MAX_DEPTH."""

    def __init__(self, stream):
        super().__init__(stream)
        self._sizes: dict[int, int] = {}    # id(node) -> nodes it expands to
        self._depth = 0

    def compose_node(self, parent, index):
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.constructor.ConstructorError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if not alias:
            kids = node.value if isinstance(node, yaml.SequenceNode) else (
                [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else [])
            size = 1 + sum(self._sizes.get(id(k), 1) for k in kids)
            self._sizes[id(node)] = size
            if size > MAX_NODES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"expands to more than {MAX_NODES:,} nodes through its aliases (*name)", mark)
        return node

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content; UserError naming the file (and line) if it is missing or unreadable.
    `what` names the file's kind in the message ("recipe", "hparams")."""
    p = Path(path)
    if not p.is_file():
        raise UserError(str(p), f"{what} file not found")
    try:
        return yaml.load(p.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise UserError(where, f"unreadable YAML ({getattr(e, 'problem', None) or e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(str(p), f"cannot read file ({e})") from None
    except RecursionError:
        raise UserError(str(p), "unreadable YAML (nested too deeply)") from None
