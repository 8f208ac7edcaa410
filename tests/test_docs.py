"""The documentation cannot rot: README.md and docs/*.md are checked against the code.

- every ```python block runs as written (each in a fresh namespace, from an empty temporary folder); a
  block that cannot run anywhere is marked by a `<!-- no-exec -->` line right above its fence;
- the option tables of docs/commands.md are what `bench/command_docs.py` generates from the CLI, every
  command has one, and the options the CLI declares are the ones `--help` prints;
- a `--flag` named in a command's section of docs/commands.md, or on a `mutransfer COMMAND ...` line
  anywhere in the docs, is an option of that command;
- the README stays an entry point (at most 250 lines), and every relative link or image points to a file
  that exists and every `#anchor` to one of its headings;
- recipes shown in the docs (YAML blocks that start with `name:`) load.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mutransfer.cli import app

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
NO_EXEC = "<!-- no-exec -->"
# Pages that other branches of the same round add (docs/index.md and the README already link them). Their
# links may point nowhere until those branches are merged; any other missing target fails. Once a page
# exists, links to it are checked like any other.
ARRIVING: set = set()   # pages linked before their branch landed (none now)
# `--flags` on docs/commands.md that belong to other programs (torchrun, tensorboard), not to a command.
FOREIGN_FLAGS = {"--nproc-per-node", "--logdir", "--help"}

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def _command_docs():
    spec = importlib.util.spec_from_file_location("command_docs", REPO / "bench" / "command_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blocks(lang: str):
    """(page, index, code, marked no-exec) for every fenced block of `lang` in the docs."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for i, m in enumerate(m for m in FENCE.finditer(text) if m.group(1) == lang):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            out.append((page, i, m.group(2), before == NO_EXEC))
    return out


PYTHON = _blocks("python")


def test_there_are_python_examples_to_run():
    assert any(p.name == "README.md" for p, *_ in PYTHON) and len(PYTHON) >= 3


@pytest.mark.parametrize("page,index,code,skip", PYTHON, ids=[f"{_rel(p)}#{i}" for p, i, _, _ in PYTHON])
def test_python_block_runs(page, index, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"{_rel(page)} block {index} is marked {NO_EXEC}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{_rel(page)} (python block {index})", "exec"), {"__name__": "__docs__"})


def _commands():
    return _command_docs().commands()


def _options(cmd) -> set[str]:
    return {o for p in _command_docs().options(cmd) for o in [*p.opts, *p.secondary_opts]}


def test_option_tables_are_generated_from_the_cli():
    cd = _command_docs()
    text = cd.PAGE.read_text()
    marked = [m.group("cmd") for m in cd.MARKER.finditer(text)]
    cmds = cd.commands()
    assert sorted(marked) == sorted(cmds), "every command needs exactly one `<!-- options: NAME -->` table"
    assert cd.render(text, cmds) == text, "docs/commands.md differs from --help: run python bench/command_docs.py"


def test_the_generated_table_is_a_table_of_the_options():
    cd = _command_docs()
    cmds = cd.commands()
    table = cd.table("tune", cmds["tune"])
    rows = [r for r in table.splitlines() if r.startswith("| `--")]
    assert len(rows) == len(cd.options(cmds["tune"])) and any(r.startswith("| `--trials` |") for r in rows)
    assert all(r.count(" | ") == 2 for r in rows)             # pipes inside help texts are escaped
    assert "&lt;name&gt;" in table and "<name>" not in table  # placeholders shown, not read as HTML


@pytest.mark.parametrize("name", sorted(_commands()))
def test_declared_options_are_what_help_prints(name):
    res = CliRunner().invoke(app, [name, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    shown = set(FLAG.findall(res.output)) - {"--help"}
    assert shown == _options(_commands()[name])


def _sections(text: str) -> list[tuple[str, str]]:
    """(H2 heading, body up to the next H2) of a page, code blocks included."""
    parts = re.split(r"(?m)^## ", text)
    return [(p.split("\n", 1)[0], p) for p in parts[1:]]


def test_flags_on_the_commands_page_are_options_of_their_command():
    cmds = _commands()
    every = set().union(*(_options(c) for c in cmds.values()))
    text = (REPO / "docs" / "commands.md").read_text()
    checked = set()
    for heading, body in _sections(text):
        m = re.search(r"mutransfer ([\w-]+)", heading)
        if m:
            assert m.group(1) in cmds, f"docs/commands.md: section for an unknown command: {heading}"
            checked.add(m.group(1))
        allowed = _options(cmds[m.group(1)]) if m else every
        wrong = set(FLAG.findall(body)) - allowed - FOREIGN_FLAGS
        assert not wrong, f"docs/commands.md, section {heading!r}: not options of that command: {sorted(wrong)}"
    assert checked == set(cmds), "docs/commands.md needs a `## `mutransfer NAME`` section per command"


def _command_lines(text: str):
    """Every `mutransfer COMMAND ...` invocation written in a shell block or an inline code span."""
    for m in FENCE.finditer(text):
        if m.group(1) in ("bash", "sh", "shell", "console"):
            for line in m.group(2).replace("\\\n", " ").splitlines():
                yield line.split(" #", 1)[0]
    prose = FENCE.sub("", text)
    yield from re.findall(r"`([^`\n]+)`", prose)


def test_command_lines_anywhere_in_the_docs_use_real_options():
    cmds = _commands()
    seen = 0
    for page in PAGES:
        for line in _command_lines(page.read_text()):
            for m in re.finditer(r"\bmutransfer(?:\.cli)? ([a-z][\w-]*)", line):
                if m.group(1) not in cmds:
                    continue
                seen += 1
                wrong = set(FLAG.findall(line[m.end():].split(" mutransfer ")[0])) - _options(cmds[m.group(1)])
                assert not wrong, f"{_rel(page)}: `{line.strip()}`: not options of {m.group(1)}: {sorted(wrong)}"
    assert seen >= 10


def test_readme_is_an_entry_point():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    assert not [ln for ln in lines if ln.startswith("#") and len(ln) > 80], "headings are topics, not synopses"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"`|\*\*|\*", "", heading.strip()).lower()
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", h)
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    out, seen = set(), {}
    for m in re.finditer(r"(?m)^#{1,6} (.+)$", FENCE.sub("", page.read_text())):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_slugs_follow_github():
    assert _slug("Speed on a GPU: MFU and the overhead of μP") == "speed-on-a-gpu-mfu-and-the-overhead-of-μp"
    assert _slug("MLP, AdamW, widths 64 → 1024") == "mlp-adamw-widths-64--1024"
    assert _slug("`mutransfer coord-check`") == "mutransfer-coord-check"


def test_every_relative_link_points_to_a_file_and_heading():
    bad, arriving_seen = [], set()
    for page in PAGES:
        prose = FENCE.sub("", page.read_text())
        prose = re.sub(r"`[^`\n]*`", "", prose)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue                                        # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            rel = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
            if not dest.exists():
                if rel in ARRIVING:
                    arriving_seen.add(rel)
                    continue
                bad.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{_rel(page)}: {target} (no heading with that anchor)")
    assert not bad, "\n".join(bad)


def test_recipes_shown_in_the_docs_load(tmp_path):
    from mutransfer.run.recipe import load_recipe

    shown = [(p, code) for p, _, code, _ in _blocks("yaml") if code.startswith("name:")]
    assert len(shown) >= 2
    for i, (page, code) in enumerate(shown):
        f = tmp_path / f"r{i}.yaml"
        f.write_text(code)
        load_recipe(f)          # raises UserError naming the field if a page shows an invalid recipe
