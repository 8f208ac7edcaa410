"""`scale`'s last word: its final validation loss against the prediction `mutransfer predict` wrote into
the hparams file (report/predict_fit.check), and the ladder's figure with the target's point."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..outputs_guard import check_output
from ..report.predict_fit import check
from ..run import experiment
from ..run.recipe import Recipe


def check_scale(val_loss: Optional[float], src, recipe: Recipe, width: int, steps: int, batch: int,
                out: Optional[Path] = None) -> dict:
    """Called by `scale` at the end: its final validation loss against the hparams file's prediction.
    When there is one for this width, also draws the ladder with this run's point (OUT/prediction.png)."""
    pred = (src.file or {}).get("prediction")
    c = check(val_loss, pred, width=width, steps=steps, batch_size=batch, hparams=src.hparams.flat(),
              base_width=src.base_width, depth=experiment.depth_of(recipe))
    if c["status"] in ("ok", "missed") and out is not None:
        try:
            from ..report.predict_plot import plot_prediction

            p = out / "prediction.png"
            check_output(p, "--out", "prediction plot")
            plot_prediction(pred, p, {str(width): val_loss}, title=f"{recipe.name}: {steps} steps, batch {batch}")
            c["plot"] = str(p)
        except (UserError, OSError, ImportError, ValueError) as e:      # a figure never fails a finished run
            c["plot_error"] = f"{type(e).__name__}: {e}"
    return c
