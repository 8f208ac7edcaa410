"""The trained target back from a `scale` run folder, and its export for use without mutransfer.

    model = mutransfer.load("runs/gpt-pysource/scale-1024")        # newest checkpoint, eval mode
    mutransfer export runs/gpt-pysource/scale-1024 exported/       # model.pt + config.json

`load` rebuilds the model from the run's resolved recipe.yaml and hparams.yaml (its width, its proxy
width, the values used), re-attaches every forward multiplier of the plan (a tied readout's), and
loads the checkpoint's weights. `export` writes a state_dict for the factory's *plain* model: a tied
readout's multiplier cannot live in a table it shares with the embedding, so when the factory can be
built untied (an argument `tied`, or Hugging Face's `tie_word_embeddings`) the readout is exported
untied with the multiplier folded into its own weight; otherwise the multiplier is written to
config.json for the user to apply, and the command says so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..atomic import write_text, write_via
from ..engine.hparams import HParams
from ..errors import UserError
from ..outputs_guard import check_out_dir, marker
from ..run import checkpoint as C
from ..run import experiment
from ..run.recipe import parse_recipe
from ..yaml_io import load_yaml


def _run_files(run_dir: Path) -> tuple:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(str(run_dir), "not a scale run folder (no such directory)")
    for name in ("recipe.yaml", "hparams.yaml"):
        if not (run_dir / name).is_file():
            raise UserError(str(run_dir), f"not a scale run folder (no {name})")
    recipe = parse_recipe(load_yaml(run_dir / "recipe.yaml", "recipe"), str(run_dir / "recipe.yaml"))
    hp_used = load_yaml(run_dir / "hparams.yaml", "hparams")
    _check_run_hparams(run_dir / "hparams.yaml", hp_used, recipe)
    return recipe, hp_used


def _check_run_hparams(p: Path, d: Any, recipe) -> None:
    """A run folder's hparams.yaml (scale wrote it; someone may have edited or damaged it): every field
    `load` and `export` use, typed and in range, before anything is built or written."""
    from ..engine.hparams import TUNABLE_NAMES
    from ..run.hparams_file import value_problem
    if not isinstance(d, dict):
        raise UserError(str(p), "must be a YAML mapping (scale writes one)")
    for k in ("width", "proxy_width"):
        v = d.get(k)
        if v is None:
            raise UserError(f"{p}: {k}", "required field is missing")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= 2**24:
            raise UserError(f"{p}: {k}", f"must be a positive integer, got {v!r}")
    for k in ("depth", "proxy_depth"):
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= 100_000):
            raise UserError(f"{p}: {k}", f"must be a positive integer or null, got {v!r}")
    hp = d.get("hparams", {})
    if not isinstance(hp, dict):
        raise UserError(f"{p}: hparams", "must be a mapping of tunable name to value")
    for k, v in hp.items():
        if k not in TUNABLE_NAMES:
            raise UserError(f"{p}: hparams.{k}", f"unknown tunable; known: {', '.join(TUNABLE_NAMES)}")
        if not isinstance(v, (int, float, bool)):
            raise UserError(f"{p}: hparams.{k}", f"must be a number, got {v!r}")
        why = value_problem(k, v)
        if why:
            raise UserError(f"{p}: hparams.{k}", f"{why}, got {v!r}")
    if d.get("optimizer") not in (None, recipe.train.optimizer):
        raise UserError(f"{p}: optimizer", f"{d['optimizer']!r} but the run's recipe.yaml says "
                                           f"{recipe.train.optimizer!r}")


def _check_state(state: Any, shapes, where: str) -> dict:
    """The checkpoint's model state holds every parameter at the shape the run's files describe."""
    if not isinstance(state, dict):
        raise UserError(where, "the checkpoint holds no model state (not written by scale)")
    for name, s in shapes.params.items():
        t = state.get(name)
        if t is None:
            raise UserError(where, f"the checkpoint has no {name!r}; it does not match the run's recipe.yaml")
        if tuple(t.shape) != tuple(s.shape):
            raise UserError(where, f"{name} is {tuple(t.shape)} in the checkpoint but {tuple(s.shape)} at the "
                                   "width and depth of the run's hparams.yaml (edited?)")
    return state


def _checkpoint(run_dir: Path, checkpoint: Optional[str | Path]) -> tuple[Path, dict]:
    if checkpoint is None:
        path = C.latest(Path(run_dir) / "checkpoints")
        if path is None:
            raise UserError(str(run_dir), "has no checkpoint (checkpoints/step-*.pt)")
    else:
        path = Path(checkpoint)
        if not path.is_absolute() and not path.exists():
            path = Path(run_dir) / "checkpoints" / path
        if not path.is_file():
            raise UserError("checkpoint", f"{checkpoint}: no such checkpoint")
    try:
        ck = C.load(path)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(str(path), f"unreadable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
        raise UserError(str(path), "not a scale checkpoint (no model state)")
    return path, ck


def load(run_dir: str | Path, checkpoint: Optional[str | Path] = None, *, device: str = "cpu") -> nn.Module:
    """The trained target of a scale run: built at its width, every forward multiplier attached,
    the checkpoint's weights loaded, in eval mode."""
    recipe, hp_used = _run_files(Path(run_dir))
    _, ck = _checkpoint(Path(run_dir), checkpoint)
    hp = HParams.from_train(recipe.train).with_values(dict(hp_used.get("hparams", {})))
    if recipe.depths is not None and hp_used.get("depth"):
        recipe = experiment.at_depth(recipe, int(hp_used["depth"]))
    _check_state(ck["model"], experiment.shapes_for(recipe, int(hp_used["width"]), int(hp_used["proxy_width"])),
                 str(Path(run_dir) / "hparams.yaml"))
    pm = experiment.build(recipe, int(hp_used["width"]), hp, device=device,
                          base_width=int(hp_used["proxy_width"]), base_depth=hp_used.get("proxy_depth"))
    missing, unexpected = pm.model.load_state_dict(ck["model"], strict=False)
    if missing or unexpected:
        raise UserError(str(run_dir), f"the checkpoint does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    pm.model.eval()
    return pm.model


def export(run_dir: str | Path, out: str | Path, checkpoint: Optional[str | Path] = None) -> tuple[Path, list[str]]:
    """Write OUT/model.pt (state_dict of the factory's plain model) and OUT/config.json; the notes."""
    run_dir = Path(run_dir)
    recipe, hp_used = _run_files(run_dir)
    ck_path, ck = _checkpoint(run_dir, checkpoint)
    r_run, r_out = run_dir.resolve(), Path(out).resolve()
    if r_out == r_run or r_run in r_out.parents:
        raise UserError("OUT", f"{out} is inside the run folder {run_dir}; export to a folder of its own")
    out = check_out_dir(out, "OUT")
    ours = (out / "config.json").is_file() and marker("export").encode() in (out / "config.json").read_bytes()[:1 << 16]
    for name in ("model.pt", "config.json"):
        if (out / name).exists() and not ours:
            raise UserError("OUT", f"{out / name} exists and was not written by mutransfer export; "
                            "refusing to overwrite it")
    width, base = int(hp_used["width"]), int(hp_used["proxy_width"])
    if recipe.depths is not None and hp_used.get("depth"):
        recipe = experiment.at_depth(recipe, int(hp_used["depth"]))
    shapes = experiment.shapes_for(recipe, width, base)
    _check_state(ck["model"], shapes, str(run_dir / "hparams.yaml"))
    hp = HParams.from_train(recipe.train).with_values(dict(hp_used.get("hparams", {})))
    from ..engine.plan import make_plan
    plan = make_plan(shapes, hp, recipe.train.optimizer, "mup", recipe.factory_init)
    state = dict(ck["model"])
    args: dict[str, Any] = experiment.model_args(recipe)
    notes: list[str] = []
    unfolded: dict[str, float] = {}
    for mod, m in plan.readout_multipliers.items():
        table = shapes.tied_readouts[mod]
        key = "tied" if "tied" in args or recipe.model.factory == "builtin:gpt" else (
            "tie_word_embeddings" if recipe.model.factory.startswith("hf:") else None)
        if key is not None:
            args[key] = False
            state[f"{mod}.weight"] = state[table] * m
            notes.append(f"{mod}: exported untied ({key}: false), its weight = {table} x {m:.6g} "
                         "(the forward multiplier folded in)")
        else:
            unfolded[mod] = m
            notes.append(f"{mod}: tied to {table} with a forward multiplier {m:.6g} on its input that cannot be "
                         "folded into the shared table; apply it yourself (config.json readout_multipliers)")
    config = {"written_by": marker("export"), "factory": recipe.model.factory, "width": width, "args": args,
              "model": {k: v for k, v in recipe.model.model_dump(mode="json").items() if k not in ("factory", "args")},
              "proxy_width": base, "checkpoint": str(ck_path), "step": int(ck.get("step", 0)),
              "readout_multipliers": unfolded, "notes": notes}
    out.mkdir(parents=True, exist_ok=True)

    def save(tmp: str) -> None:
        torch.save(state, tmp)
    write_via(out / "model.pt", save)
    write_text(out / "config.json", json.dumps(config, indent=1))
    return out, notes
