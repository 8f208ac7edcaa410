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
import yaml
from torch import nn

from ..atomic import write_text, write_via
from ..engine.hparams import HParams
from ..errors import UserError
from ..outputs_guard import check_out_dir, marker
from ..run import checkpoint as C
from ..run import experiment
from ..run.recipe import parse_recipe


def _run_files(run_dir: Path) -> tuple:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(str(run_dir), "not a scale run folder (no such directory)")
    for name in ("recipe.yaml", "hparams.yaml"):
        if not (run_dir / name).is_file():
            raise UserError(str(run_dir), f"not a scale run folder (no {name})")
    recipe = parse_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()), str(run_dir / "recipe.yaml"))
    hp_used = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    return recipe, hp_used


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
        return path, C.load(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(str(path), f"unreadable checkpoint ({type(e).__name__}: {e})") from None


def load(run_dir: str | Path, checkpoint: Optional[str | Path] = None, *, device: str = "cpu") -> nn.Module:
    """The trained target of a scale run: built at its width, every forward multiplier attached,
    the checkpoint's weights loaded, in eval mode."""
    recipe, hp_used = _run_files(Path(run_dir))
    _, ck = _checkpoint(Path(run_dir), checkpoint)
    hp = HParams.from_train(recipe.train).with_values(dict(hp_used.get("hparams", {})))
    if recipe.depths is not None and hp_used.get("depth"):
        recipe = experiment.at_depth(recipe, int(hp_used["depth"]))
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
    out = check_out_dir(out, "OUT")
    ours = (out / "config.json").is_file() and marker("export").encode() in (out / "config.json").read_bytes()[:1 << 16]
    for name in ("model.pt", "config.json"):
        if (out / name).exists() and not ours:
            raise UserError("OUT", f"{out / name} exists and was not written by mutransfer export; "
                            "refusing to overwrite it")
    width, base = int(hp_used["width"]), int(hp_used["proxy_width"])
    shapes = experiment.shapes_for(recipe, width, base)
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
