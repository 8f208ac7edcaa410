"""The option tables of docs/commands.md, generated from the CLI itself, so the page cannot drift from
`--help`.

    python bench/command_docs.py           # rewrite the tables in docs/commands.md
    python bench/command_docs.py --check   # exit 1 and name the tables that differ (what tests/test_docs.py asserts)

Each table sits between `<!-- options: COMMAND -->` and `<!-- /options -->`; everything outside the
markers is written by hand and left alone. A command added to the CLI needs a section with its marker
(the test names the missing one). Rows come from the Typer command's parameters: flag, default, help.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "commands.md"
MARKER = re.compile(r"(<!-- options: (?P<cmd>[\w-]+) -->\n)(?P<body>.*?)(<!-- /options -->)", re.S)


def commands() -> dict:
    """{command name: click-like command} of the `mutransfer` CLI, as `--help` sees them."""
    import typer

    from mutransfer.cli import app

    return dict(typer.main.get_command(app).commands)


def options(cmd) -> list:
    """The command's options (not its positional arguments), in declaration order."""
    return [p for p in cmd.params if p.param_type_name == "option"]


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, <placeholders> shown rather than read as HTML."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _default(p) -> str:
    if getattr(p, "is_flag", False):
        return "off (a switch)"
    d = p.default
    if d is None or d == [] or d == ():
        return ""
    return f"`{getattr(d, 'value', d)}`"                     # an Enum member shows its value, as --help does


def table(name: str, cmd) -> str:
    """The markdown table of `mutransfer NAME`'s options."""
    args = " ".join(a.name.upper() for a in cmd.params if a.param_type_name == "argument")
    rows = [f"`mutransfer {name} {args} [OPTIONS]`" if args else f"`mutransfer {name} [OPTIONS]`", "",
            "| option | default | meaning |", "|---|---|---|"]
    for p in options(cmd):
        flag = " / ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        meaning = _cell(p.help or "") + (" (repeatable)" if p.multiple and "repeatable" not in (p.help or "") else "")
        rows.append(f"| {flag} | {_default(p)} | {meaning} |")
    return "\n".join(rows) + "\n"


def render(text: str, cmds: dict) -> str:
    """`text` with every marked table regenerated from `cmds`."""
    def sub(m):
        name = m.group("cmd")
        if name not in cmds:
            raise SystemExit(f"docs/commands.md: a table for `{name}`, which is not a command")
        return m.group(1) + table(name, cmds[name]) + m.group(4)
    return MARKER.sub(sub, text)


def main(argv: list[str]) -> int:
    text = PAGE.read_text()
    cmds = commands()
    new = render(text, cmds)
    marked = {m.group("cmd") for m in MARKER.finditer(text)}
    missing = sorted(set(cmds) - marked)
    if "--check" in argv:
        stale = [m.group("cmd") for m, n in zip(MARKER.finditer(text), MARKER.finditer(new))
                 if m.group("body") != n.group("body")]
        for c in stale:
            print(f"docs/commands.md: the options of `{c}` differ from --help (run python bench/command_docs.py)")
        for c in missing:
            print(f"docs/commands.md: no `<!-- options: {c} -->` table for the command `{c}`")
        return 1 if stale or missing else 0
    if new != text:
        PAGE.write_text(new)
        print("rewrote docs/commands.md")
    for c in missing:
        print(f"docs/commands.md: add a section with `<!-- options: {c} -->` and `<!-- /options -->` for `{c}`")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
