"""The user's code (run/user_code.py): imports made late (inside the factory), modules that extend
sys.path themselves and package-relative imports all work for the whole run, while a ./torch.py or
./matplotlib.py in the working directory never replaces the installed module."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import cli_in

REPO = Path(__file__).resolve().parents[1]


def _recipe(folder: Path, factory: str, name: str) -> Path:
    r = {"name": name, "model": {"factory": factory, "args": {"d_in": 8, "d_out": 4}},
         "data": {"factory": "builtin:vectors", "args": {"dim": 8, "classes": 4}},
         "widths": {"proxy": 16, "target": 32},
         "train": {"optimizer": "adamw", "lr": 1e-2, "steps": 2, "batch_size": 4, "eval_batches": 1}}
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


NET = ("import torch\n"
       "class Net(torch.nn.Sequential):\n"
       "    def __init__(self, width, d_in, d_out):\n"
       "        super().__init__(torch.nn.Linear(d_in, width), torch.nn.ReLU(), torch.nn.Linear(width, d_out))\n")


@pytest.fixture
def clean_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for m in set(sys.modules) - before:
        if m.split(".")[0].startswith("p23_"):
            del sys.modules[m]


def _dry(folder: Path, r: Path):
    res = cli_in(folder, "scale", r, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "lr" in res.output and "error" not in res.output
    return res


def test_a_factory_that_imports_lazily_runs(tmp_path, clean_path):
    (tmp_path / "p23_lazymodel.py").write_text(NET)
    (tmp_path / "p23_lazyfactory.py").write_text(
        "def make(width, d_in, d_out):\n    from p23_lazymodel import Net\n    return Net(width, d_in, d_out)\n")
    _dry(tmp_path, _recipe(tmp_path, "p23_lazyfactory:make", "lazy"))


def test_a_module_that_extends_sys_path_itself_runs(tmp_path, clean_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "p23_srcmodel.py").write_text(NET)
    # the habit: put my own folder (and ./src) on the path, import from there later
    (tmp_path / "p23_selfext.py").write_text(
        "import os, sys\n"
        "sys.path.append(os.getcwd())\n"
        "sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'src'))\n"
        "def make(width, d_in, d_out):\n    from p23_srcmodel import Net\n    return Net(width, d_in, d_out)\n")
    _dry(tmp_path, _recipe(tmp_path, "p23_selfext:make", "selfext"))


def test_a_package_with_relative_imports_runs_from_another_folder(tmp_path, clean_path):
    proj = tmp_path / "proj"
    (proj / "p23_pkg").mkdir(parents=True)
    (proj / "p23_pkg" / "__init__.py").write_text("")
    (proj / "p23_pkg" / "model.py").write_text(NET)
    (proj / "p23_pkg" / "factory.py").write_text(
        "def make(width, d_in, d_out):\n    from .model import Net\n    return Net(width, d_in, d_out)\n")
    r = _recipe(proj, "p23_pkg.factory:make", "pkg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _dry(elsewhere, r)          # found through the recipe's folder, not only the working directory


def test_a_script_style_import_beside_the_factory_module_works(tmp_path, clean_path):
    (tmp_path / "p23_sub").mkdir()
    (tmp_path / "p23_sub" / "__init__.py").write_text("")
    (tmp_path / "p23_sub" / "p23_besidemodel.py").write_text(NET)
    (tmp_path / "p23_sub" / "fac.py").write_text(
        "def make(width, d_in, d_out):\n    from p23_besidemodel import Net\n    return Net(width, d_in, d_out)\n")
    _dry(tmp_path, _recipe(tmp_path, "p23_sub.fac:make", "beside"))


def test_a_missing_module_is_one_line_naming_the_field(tmp_path, clean_path):
    res = cli_in(tmp_path, "scale", _recipe(tmp_path, "p23_nothere:make", "missing"), "--dry-run")
    assert res.exit_code == 2
    assert "model.factory" in res.output and "p23_nothere" in res.output and "Traceback" not in res.output


def test_a_torch_py_or_matplotlib_py_in_the_working_directory_never_shadows(tmp_path):
    (tmp_path / "torch.py").write_text("raise SystemExit('the stray ./torch.py was imported')\n")
    (tmp_path / "matplotlib.py").write_text("raise SystemExit('the stray ./matplotlib.py was imported')\n")
    (tmp_path / "p23_model.py").write_text(NET)
    (tmp_path / "p23_fac.py").write_text(
        "def make(width, d_in, d_out):\n    from p23_model import Net\n    return Net(width, d_in, d_out)\n")
    _recipe(tmp_path, "p23_fac:make", "shadow")
    code = ("import sys\n"
            "from mutransfer.cli import main\n"
            "try:\n    main(['scale', 'shadow.yaml', '--dry-run'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "import matplotlib, torch\n"
            "assert 'site-packages' in matplotlib.__file__ or 'dist-packages' in matplotlib.__file__, matplotlib.__file__\n"
            "print('torch from', torch.__file__)\n")
    # -P: python itself must not put the working directory first (as the `mutransfer` script does not)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stray" not in out.stdout + out.stderr
    assert str(tmp_path) not in out.stdout.split("torch from", 1)[1]


def test_a_factory_module_named_like_an_installed_one_is_refused_not_swapped(tmp_path, clean_path):
    (tmp_path / "optuna.py").write_text(NET + "def make(width, d_in, d_out):\n    return Net(width, d_in, d_out)\n")
    res = cli_in(tmp_path, "scale", _recipe(tmp_path, "optuna:make", "named"), "--dry-run")
    assert res.exit_code == 2, res.output
    assert "rename" in res.output and "model.factory" in res.output
