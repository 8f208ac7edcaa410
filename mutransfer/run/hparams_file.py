"""The hparams file `tune` writes and `scale` reads (default runs/<name>/hparams.yaml):

    recipe: recipes/quickstart.yaml
    proxy_width: 64
    optimizer: adamw
    hparams: {lr: 0.0031, output_init: 1.7}
    best_value: 2.41          # the proxy's validation loss with these values
    study: quickstart
    storage: sqlite:///runs/quickstart/study.db
    steps: 60                 # train.steps the proxy was tuned with
    prediction: {...}         # `mutransfer predict`: the ladder, the fit and the target's predicted loss
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from ..atomic import write_text
from ..engine.hparams import TUNABLES, HParams, unknown
from ..errors import UserError, mask_secrets
from ..outputs_guard import marker
from ..yaml_io import load_yaml

REQUIRED = ("proxy_width", "optimizer", "hparams")


def default_path(recipe_name: str, runs_dir: str | Path = "runs") -> Path:
    return Path(runs_dir) / recipe_name / "hparams.yaml"


def write_hparams_file(path: str | Path, *, recipe: str, proxy_width: int, optimizer: str, hparams: dict[str, Any],
                       best_value: Optional[float], study: str, storage: str, steps: Optional[int] = None,
                       extra: Optional[dict] = None) -> Path:
    """Write atomically (temporary file, then rename)."""
    d = {"written_by": marker("hparams"), "recipe": str(recipe), "proxy_width": int(proxy_width), "optimizer": optimizer,
         "hparams": {k: (v if isinstance(v, bool) else float(v)) for k, v in hparams.items()},
         "best_value": None if best_value is None else float(best_value), "study": study, "storage": mask_secrets(storage)}
    if steps is not None:
        d["steps"] = int(steps)
    if extra:
        d.update(extra)
    kept = _kept_prediction(path, d)
    if kept is not None:                 # a re-tune that lands on the same values keeps the ladder's prediction
        d["prediction"] = kept
    return write_text(path, yaml.safe_dump(d, sort_keys=False))


def _kept_prediction(path: str | Path, d: dict) -> Optional[dict]:
    try:
        old = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    pred = old.get("prediction") if isinstance(old, dict) else None
    if not isinstance(pred, dict) or pred.get("proxy_width") != d["proxy_width"] or pred.get("tuned") != d["hparams"] \
            or old.get("horizon") != d.get("horizon"):      # the ladder trained with the old horizon factors
        return None
    return pred


def write_prediction(path: str | Path, prediction: dict) -> Path:
    """Add (replace) the `prediction` field of an existing hparams file; everything else is kept."""
    d = read_hparams_file(path)
    d["prediction"] = prediction
    return write_text(path, yaml.safe_dump(d, sort_keys=False))


def read_hparams_file(path: str | Path) -> dict:
    """Parse and validate; UserError naming the file and field on any problem."""
    p = Path(path)
    d = load_yaml(p, "hparams")
    if not isinstance(d, dict):
        raise UserError(str(p), "an hparams file must be a YAML mapping")
    for k in REQUIRED:
        if k not in d:
            raise UserError(f"{p}: {k}", "required field is missing")
    if not isinstance(d["hparams"], dict):
        raise UserError(f"{p}: hparams", "must be a mapping of tunable name to value")
    for k, v in d["hparams"].items():
        if k not in TUNABLES:
            raise UserError(f"{p}: hparams.{k}", unknown(k))
        why = value_problem(k, v)
        if why:
            raise UserError(f"{p}: hparams.{k}", f"{why}, got {v!r}")
    if "prediction" in d and not isinstance(d["prediction"], dict):
        raise UserError(f"{p}: prediction", "must be a mapping (written by `mutransfer predict`)")
    if isinstance(d["proxy_width"], bool) or not isinstance(d["proxy_width"], int) or not 0 < d["proxy_width"] < 2**31:
        raise UserError(f"{p}: proxy_width", f"must be a positive integer, got {d['proxy_width']!r}")
    check_fields(p, d)
    return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(p: Path, d: dict) -> None:
    """Every other field's type and range, when read (not at the end of a run that uses it)."""
    import math
    if not isinstance(d["optimizer"], str) or not d["optimizer"].strip():
        raise UserError(f"{p}: optimizer", f"must name the optimizer tuned with, got {d['optimizer']!r}")
    bv = d.get("best_value")
    if bv is not None and (isinstance(bv, bool) or not isinstance(bv, (int, float)) or not math.isfinite(bv)):
        raise UserError(f"{p}: best_value", f"must be a finite number (the proxy's validation loss) or null, got {bv!r}")
    for k, low in (("steps", 1), ("proxy_depth", 1), ("trials", 0)):
        v = d.get(k)
        if v is not None and (not _is_int(v) or not low <= v < 2**31):
            raise UserError(f"{p}: {k}", f"must be an integer >= {low} or absent, got {v!r}")
    for k in ("recipe", "study", "storage"):
        v = d.get(k)
        if v is not None and not isinstance(v, str):
            raise UserError(f"{p}: {k}", f"must be text, got {v!r}")


def value_problem(name: str, v) -> Optional[str]:
    """Why a tuned value is out of its range (None when it is fine): its tunable's range (TUNABLES),
    and a positive number no larger than 1e6 (a file may have been edited by hand)."""
    t = TUNABLES[name]
    why = t.problem(v)
    if why is None and t.range == "positive" and v > 1e6:
        return "is implausibly large (> 1e6)"
    return why


def apply_hparams_file(base: HParams, d: dict, recipe_optimizer: str, where: str) -> HParams:
    """The recipe's HParams with the file's tuned values; refuses a file tuned with another optimizer."""
    if d["optimizer"] != recipe_optimizer:
        raise UserError(where, f"tuned with optimizer {d['optimizer']!r} but the recipe uses {recipe_optimizer!r}")
    return base.with_values(d["hparams"])
