"""The package's layers (docs/code.md): each module imports only from its own layer or the ones
below it, and no module imports another that (directly or not) imports it back. Read from the source
text (every `from .x import` / `from ..x import`, including those inside functions)."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mutransfer"
FOUNDATIONS = {"errors", "atomic", "outputs_guard", "signals", "threads", "console", "yaml_io", "quiet", "flags"}
# a layer may import from the layers listed for it (and from itself)
ALLOWED = {
    "foundations": {"foundations"},
    "engine": {"foundations"},
    "models": {"foundations"},
    "data": {"foundations"},
    "run": {"foundations", "engine", "models", "data"},
    "report": {"foundations", "engine", "models", "data", "run"},
    "commands": {"foundations", "engine", "models", "data", "run", "report"},
    "top": {"foundations", "engine", "models", "data", "run", "report", "commands"},   # __init__, cli
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        parts = [x for x in rel.parts if x != "__init__"]
        out[".".join(parts)] = p
    return out


def _layer(name: str) -> str:
    head = name.split(".")[0]
    if head in ("engine", "run", "report", "commands", "models", "data"):
        return head
    if head in FOUNDATIONS:
        return "foundations"
    return "top"


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports (relative imports resolved)."""
    pkg_parts = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "":
        pkg_parts = []
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                out.add(full if full in known else target)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_imports_only_its_layer_and_those_below():
    bad = []
    for name, deps in _graph().items():
        for d in deps:
            if _layer(d) != _layer(name) and _layer(d) not in ALLOWED[_layer(name)]:
                bad.append(f"{name} ({_layer(name)}) imports {d} ({_layer(d)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, path: list[str]) -> bool:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1 and d != "":          # the package __init__ imports its children
                cycle.extend(path[path.index(d):] + [d] if d in path else [n, d])
                return True
            if d not in state and visit(d, path + [d]):
                return True
        state[n] = 2
        return False

    for n in sorted(graph):
        if n and n not in state and visit(n, [n]):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_public_functions_are_not_shadowed_by_modules():
    import mutransfer
    import mutransfer.commands.coord_check  # noqa: F401
    import mutransfer.commands.trained  # noqa: F401

    assert callable(mutransfer.load) and callable(mutransfer.tune) and callable(mutransfer.coord_check)
    assert callable(mutransfer.export) and callable(mutransfer.parametrize)


def test_no_module_is_named_like_a_public_function():
    """`mutransfer.load` & co. are functions: a module or package of that name right under mutransfer/ would
    be rebound by its own import (the clash, and the workaround, that 0.1 had with commands/load.py)."""
    import mutransfer

    assert sorted(mutransfer.__all__) == sorted([*mutransfer._HOME, *mutransfer._MODULES])
    public = {n for n in mutransfer.__all__ if n != "spectral"}
    clash = sorted(p.name for p in PKG.iterdir() if p.stem in public and (p.suffix == ".py" or p.is_dir()))
    assert not clash, clash


def test_the_flat_import_paths_of_0_1_are_gone():
    """0.2 is the first release that promises import paths: the layered ones only."""
    assert not (PKG / "_moved.py").exists()
    for old in ("experiment", "tuning", "sweep_fit"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"mutransfer.{old}")


def test_import_mutransfer_loads_neither_optuna_nor_pydantic_nor_yaml():
    """A user who only wants `parametrize` pays for torch, not for the tuner or the recipe schema."""
    code = ("import sys, mutransfer\n"
            "m = mutransfer.parametrize; h = mutransfer.HParams(); p = mutransfer.make_plan\n"
            "print(' '.join(n for n in ('optuna', 'pydantic', 'yaml', 'matplotlib', 'typer') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(PKG.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []
    done = subprocess.run([sys.executable, "-c", "import mutransfer; print(all(map(callable, (mutransfer.tune, mutransfer.load))))"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(PKG.parent)})
    assert done.stdout.strip() == "True", done.stderr      # the lazy names still resolve


def test_the_version_is_the_projects():
    import mutransfer

    text = (PKG.parent / "pyproject.toml").read_text()
    assert f'version = "{mutransfer.__version__}"' in text


def _sources() -> dict[str, str]:
    return {str(p.relative_to(PKG)): p.read_text() for p in PKG.rglob("*.py")}


def _defined_in(pattern: str) -> list[str]:
    import re

    return sorted(name for name, text in _sources().items() if re.search(pattern, text, re.M))


def test_each_shared_rule_has_one_home():
    """Things that once lived in two or three places (issue 20), each defined in one module only."""
    assert _defined_in(r"^\s*SWEEPABLE\s*=") == ["engine/hparams.py"]
    assert _defined_in(r"^\s*(TUNABLE_NAMES|MULTIPLIER_NAMES|SCALAR_NAMES)\s*=") == ["engine/hparams.py"]
    assert _defined_in(r"^\s*(POSITIVE|UNIT)\s*=") == []                   # ranges: hparams.TUNABLES
    assert _defined_in(r"optuna\.(samplers|pruners)\.\w+\(") == ["run/search.py"]
    assert _defined_in(r"^\s*def suggest\(") == ["run/search.py"]
    assert _defined_in(r"3600") == ["console.py"]                           # H:MM:SS: console.hms
    assert _defined_in(r"math\.sqrt\(max\(1(\.0)?, \w+ / \w+\)\)") == ["engine/spectral.py"]   # torch.optim.Muon's factor
    assert _defined_in(r"must be below steps") == ["flags.py"]              # flags.warmup_problem
    assert _defined_in(r"^\s*(Optimizer|OPTIMIZERS)\s*[:=]") == ["engine/spectral.py"]
    # divergence is judged once (train.divergence), for a single model and for each slot of a TrialBatch
    assert sum(text.count("x its first value {") for text in _sources().values()) == 1


# modules that still compare optimizer names as bare strings (their owners' clean-up; shrink, never grow)
BARE_OPTIMIZER_NAMES = {"report/explain.py", "commands/scale.py", "engine/optimizers.py"}
# rule modules that run alone, importing nothing of the package (tests/test_spectral.py): their own words
STANDALONE_RULES = {"engine/spectral.py", "engine/depth.py", "engine/horizon.py"}


def test_optimizer_names_come_from_one_vocabulary():
    """`optimizer == "sgd"` and the like only through spectral's constants (SGD, ADAM, ADAMW, MUON)."""
    names = {"sgd", "adam", "adamw", "muon"}
    bare = set()
    for rel, text in _sources().items():
        if rel in STANDALONE_RULES:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Compare):
                for c in ast.walk(node):
                    if isinstance(c, ast.Constant) and c.value in names:
                        bare.add(rel)
    assert bare <= BARE_OPTIMIZER_NAMES, sorted(bare - BARE_OPTIMIZER_NAMES)


def test_every_tunable_is_declared_once_and_used_by_its_readers():
    from mutransfer.engine.hparams import SWEEPABLE, TUNABLE_NAMES, TUNABLES, HParams

    assert TUNABLE_NAMES == tuple(TUNABLES) and set(SWEEPABLE) <= set(TUNABLES)
    for name, t in TUNABLES.items():
        good = True if t.range == "bool" else 0.5
        assert t.problem(good) is None, name
        HParams().with_values({name: good})
        assert t.problem("x") is not None
    assert TUNABLES["beta1"].problem(1.0) and TUNABLES["weight_decay"].problem(-1) and TUNABLES["lr"].problem(0)
    assert TUNABLES["zero_readout"].problem(1) and TUNABLES["lr"].problem(True)


def test_tune_flags_are_the_python_api_keywords():
    """`mutransfer tune --help` lists exactly the fields of TuneOptions (the same names the Python API
    takes), so a flag added once appears at both front doors."""
    import dataclasses

    from typer.testing import CliRunner

    from mutransfer.cli import app
    from mutransfer.commands.tune_options import TuneOptions
    from mutransfer.flags import cli_name, declared

    out = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "200"}).output
    flags = {cli_name(f, m) for f, m in declared(TuneOptions) if not m.argument}
    listed = {w for w in out.replace("│", " ").split() if w.startswith("--") and w != "--help"}
    assert listed == flags
    assert [f.name for f in dataclasses.fields(TuneOptions)] == [f.name for f, _ in declared(TuneOptions)]
