"""Coordinate check: train the recipe's model a few steps at several widths and decide whether the
per-coordinate size of every module's output, and of its change since initialisation, stays put.

One job per module: coord_measure.py measures (settings, probe, runs), result_cache.py keeps finished
runs, coord_verdict.py judges (slopes with their uncertainty, regime changes, the verdict). This module
joins them for a recipe (the CLI) and keeps the names the package and its users import from here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from . import experiment
from .coord_measure import (  # noqa: F401 - the names users import from run.coord
    PROBE_SEED,
    ROOT,
    Probe,
    Recorder,
    Run,
    Settings,
    cache_key,
    check_widths,
    default_widths,
    load_run,
    measure,
    measure_one,
    parse_widths,
    probe_batch,
    resolve,
    save_run,
    training_batches,
)
from .coord_verdict import (  # noqa: F401
    BLOWUP_SLOPE,
    EXIT_CODES,
    FAILING,
    FLAGS,
    SPECTRAL_SLOPE,
    SPECTRAL_STATS,
    STATS,
    TAIL,
    VANISH_SLOPE,
    Result,
    Row,
    Z,
    band,
    decide,
    flag,
    judged,
    loglog_slope,
    matrix_fans,
    regime_changes,
    to_json,
    verdict,
)
from .recipe import Recipe


def recipe_fans(recipe: Recipe, widths: list[int]) -> dict[str, dict[int, tuple[int, int]]]:
    """parameter -> width -> (fan_in, fan_out) of the recipe's matrices (traced shapes)."""
    return matrix_fans({w: experiment.shapes_for(recipe, w) for w in widths})


def run(recipe: Recipe, s: Settings, on_run: Optional[Callable[[int, int], None]] = None,
        cache_dir: Optional[Path] = None) -> Result:
    """Measure (reading finished runs back from cache_dir) and judge."""
    fans = None if s.depth_width else recipe_fans(recipe, list(s.widths))
    return verdict(measure(recipe, s, on_run, cache_dir), s, fans, ROOT)
