"""`mutransfer coord-check`: validate the settings and every width before anything trains, measure
with a progress bar (finished runs are cached, so a rerun resumes), then the table and the files."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from rich.console import Console

from ..console import literal, make_console
from ..errors import UserError
from ..outputs_guard import check_output as guard
from ..report.coord_report import plot, progress, render, write_json
from ..run import coord
from ..run.experiment import at_depth, check_fits, check_recipe, resolve_device, shapes_for
from ..run.recipe import Recipe


def coord_check_command(recipe: Recipe, widths: Optional[str] = None, steps: Optional[int] = None,
                        seeds: Optional[int] = None, lr: Optional[float] = None, optimizer: Optional[str] = None,
                        parametrization: str = "mup", json_path: Optional[Path] = None,
                        plot_path: Optional[Path] = None, device: str = "cpu",
                        console: Optional[Console] = None, depths: Optional[str] = None,
                        width: Optional[int] = None) -> int:
    """`mutransfer coord-check`: settings, measurement with a progress bar, table, files. Returns the
    exit code (docs/verdicts.md): 0 ok, 1 blowup (something confidently wrong), 3 inconclusive (the
    seeds are too few to decide; the verdict line says how many to rerun with). Bad input raises
    UserError (exit 2) before any training."""
    if depths is not None:
        if widths is not None:
            raise UserError("--depths", "give --depths or --widths, not both")
        if recipe.depths is None:
            raise UserError("--depths", "the recipe has no depths: section")
        ds = coord.parse_widths(depths, "--depths")
        for d in ds:
            at_depth(recipe, d, "--depths")         # the recipe's depth bound, before any block is built
        if width is not None and width < 1:
            raise UserError("--width", f"must be >= 1, got {width}")
    elif width is not None:
        raise UserError("--width", "applies to depth ladders (--depths) only")
    ws = coord.parse_widths(widths) if widths is not None else None
    s = coord.resolve(recipe, ds if depths is not None else ws, steps, seeds, lr, optimizer, parametrization,
                      resolve_device(device))
    if depths is not None:
        s = replace(s, depth_width=width if width is not None else recipe.widths.proxy)
    guard(json_path, "--json", "coord-check results", [recipe.path], ".json")
    guard(plot_path, "--plot", "coord-check plot", [recipe.path], ".png")
    check_recipe(recipe)
    for w in s.widths:                # every width builds (on the meta device) and fits before anything trains
        if s.depth_width:
            shapes_for(at_depth(recipe, w), s.depth_width)
            check_fits(at_depth(recipe, w), s.depth_width, "--depths", s.device)
        else:
            shapes_for(recipe, w)
            check_fits(recipe, w, "--widths", s.device)
    with progress(s) as on_run:   # finished runs are kept in runs/<name>/coord-check/: a rerun resumes
        res = coord.run(recipe, s, on_run, cache_dir=Path("runs") / recipe.name / "coord-check")
    render(res, console)
    say = (console or make_console()).print
    if json_path:
        write_json(res, json_path)
        say(f"wrote {literal(json_path)}", highlight=False, soft_wrap=True)
    if plot_path:
        plot(res, plot_path)
        say(f"wrote {literal(plot_path)}", highlight=False, soft_wrap=True)
    return res.exit_code
