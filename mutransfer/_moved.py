"""Import paths of 0.1's flat layout, kept working: `import mutransfer.spectral` or
`from mutransfer.experiment import build` gives the very module now at mutransfer.engine.spectral /
mutransfer.run.experiment (the same object, so monkeypatching it patches the one in use)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

LAYOUT = {
    "engine": "spectral depth hparams shapes trace branches plan parametrize muon outputs",
    "run": ("recipe experiment train trial_batch batched_optim batched_trials checkpoint distributed metrics "
            "hparams_file study coord coord_attention coord_spectral"),
    # not `load`: mutransfer.load is the function (importing a module of that name would rebind it)
    "commands": "tuning tune_api scale coord_api sweep",
    "report": "coord_report tune_plot sweep_plot sweep_fit loggers explain",
    "models": "hf",
}
NEW_HOME = {name: f"mutransfer.{pkg}.{name}" for pkg, names in LAYOUT.items() for name in names.split()}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        pkg, _, name = fullname.rpartition(".")
        if pkg == "mutransfer" and name in NEW_HOME:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(NEW_HOME[spec.name.rpartition(".")[2]])

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())
