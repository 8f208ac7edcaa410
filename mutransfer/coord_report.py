"""Coordinate-check output: the rich table, the PNG and the JSON file, plus the progress bar."""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .atomic import write_via
from . import coord
from .coord import BLOWUP_SLOPE, VANISH_SLOPE, Result, Settings
from .errors import UserError
from .recipe import Recipe

COLOURS = {"ok": "green", "blowup": "bold red", "vanishing": "yellow"}


def check_output(path: Optional[Path], flag: str, suffix: Optional[str] = None) -> None:
    """Fail before any training if an output path cannot be written."""
    if path is None:
        return
    if suffix and path.suffix.lower() != suffix:
        raise UserError(flag, f"{path} must end in {suffix}")
    if path.exists() and path.is_dir():
        raise UserError(flag, f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(flag, f"{parent} is not a directory")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(flag, f"cannot write to {parent}")


@contextlib.contextmanager
def progress(s: Settings, console: Optional[Console] = None) -> Iterator:
    """A rich progress bar over widths x seeds; yields the on_run(width, seed) callback."""
    total = len(s.widths) * s.seeds
    with Progress(TextColumn("coord-check"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"width {s.widths[0]}", total=total)

        def on_run(width: int, seed: int) -> None:
            bar.update(task, advance=1, description=f"width {width} seed {seed} done")
        yield on_run


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else ("-inf" if x == -math.inf else f"{x:+.2f}")


def note(row) -> str:
    if row.flag == "blowup":
        return "grows with width"
    if row.flag == "vanishing":
        return "updates shrink with width (kernel-like)"
    return ""


def render(res: Result, console: Optional[Console] = None, limit: Optional[int] = None) -> None:
    """The table, worst slope first, then the verdict line."""
    if console is None:
        console = Console()
        if not console.is_terminal:   # piped or logged: do not squeeze module names into 80 columns
            console = Console(width=max(console.width, 150))
    s = res.settings
    t = Table(title=f"coord-check ({s.parametrization}, {s.optimizer}, lr {s.lr:g}, {s.steps} steps, "
                    f"{s.seeds} seed{'s' * (s.seeds > 1)}): values at t = {s.steps}")
    t.add_column("module", no_wrap=True)
    t.add_column("stat", no_wrap=True)
    for w in s.widths:
        t.add_column(f"w={w}", justify="right")
    t.add_column("slope", justify="right")
    t.add_column("± seeds", justify="right")
    t.add_column("verdict", no_wrap=True)
    rows = res.worst_first
    for r in rows[:limit] if limit else rows:
        c = COLOURS[r.flag]
        t.add_row(r.name, r.statistic, *(f"{v:.3g}" for v in r.values), _fmt(r.slope), f"{r.spread:.2f}",
                  f"[{c}]{r.flag}[/]")
    console.print(t)
    for d in res.diverged:
        console.print(f"[bold red]diverged[/] {d}")
    nb = sum(r.flag == "blowup" for r in res.rows)
    nv = sum(r.flag == "vanishing" for r in res.rows)
    if nv:
        console.print("[yellow]vanishing[/]: updates that shrink with width, as in the kernel regime: some "
                      "layer's LR scaling is too small, or (often at small widths with a large LR or many "
                      "steps) the narrow models move more than the limit; compare t = 1 (--json series). "
                      "Shrinking act (muP readouts, 1/d attention logits at init) is expected and not flagged.",
                      highlight=False)
    if res.verdict == "ok":
        console.print(f"[green]verdict: ok[/] (no slope above {BLOWUP_SLOPE:+.2f})"
                      + (f"; [yellow]{nv} vanishing-update warning(s)[/] (slope below {VANISH_SLOPE:+.2f})" if nv else ""))
    else:
        console.print(f"[bold red]verdict: blowup[/] ({nb} statistic(s) with slope above {BLOWUP_SLOPE:+.2f}"
                      + (", a run diverged" if res.diverged else "") + ")")


def to_json(res: Result) -> dict:
    s = res.settings

    def num(x: float):
        return x if math.isfinite(x) else (None if x != x else ("inf" if x > 0 else "-inf"))

    return {
        "verdict": res.verdict,
        "parametrization": s.parametrization,
        "optimizer": s.optimizer,
        "lr": s.lr,
        "widths": list(s.widths),
        "steps": s.steps,
        "seeds": s.seeds,
        "thresholds": {"blowup": BLOWUP_SLOPE, "vanishing": VANISH_SLOPE},
        "diverged": list(res.diverged),
        "modules": [
            {"name": r.name, "statistic": r.statistic, "values": [num(v) for v in r.values],
             "slope": num(r.slope), "spread": num(r.spread), "flag": r.flag,
             "series": [[num(v) for v in ser] for ser in r.series]}
            for r in res.worst_first
        ],
    }


def write_json(res: Result, path: Path) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(to_json(res), f, indent=1)
            f.write("\n")
    write_via(path, w)


def plot(res: Result, path: Path, max_legend: int = 12) -> None:
    """One row per statistic (act, update), columns at t = first, middle, last step; width on x,
    log-log, one line per module (blowup red, vanishing orange, ok in muted colours)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res.settings
    T = s.steps
    cols = {"act": sorted({0, T // 2, T}), "update": sorted({1, (T + 1) // 2, T})}
    ncol = max(len(v) for v in cols.values())
    fig, axes = plt.subplots(2, ncol, figsize=(4.2 * ncol + 2.5, 7.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    names = list(dict.fromkeys(r.name for r in res.worst_first))
    colour = {n: cmap(i % 20) for i, n in enumerate(names)}
    worst = set(names[:max_legend])
    for i, stat in enumerate(("act", "update")):
        rows = [r for r in res.rows if r.statistic == stat]
        for j in range(ncol):
            ax = axes[i][j]
            if j >= len(cols[stat]):
                ax.axis("off")
                continue
            t = cols[stat][j]
            for r in rows:
                ys = [ser[t] for ser in r.series]
                pts = [(w, y) for w, y in zip(s.widths, ys) if y == y and math.isfinite(y) and y > 0]
                if len(pts) < 2:
                    continue
                lw, style = (2.2, "-") if r.flag == "blowup" else ((1.6, "--") if r.flag == "vanishing" else (1.0, "-"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, lw=lw,
                        color=colour[r.name], label=r.name if r.name in worst else None)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            if lo > 0 and hi / lo < 30:          # at least 1.5 decades, so flat lines look flat
                mid = math.sqrt(lo * hi)
                ax.set_ylim(mid / math.sqrt(30), mid * math.sqrt(30))
            ax.set_xticks(list(s.widths))
            ax.set_xticklabels([str(w) for w in s.widths])
            ax.set_title(f"{stat}  (t = {t})", fontsize=10)
            ax.set_xlabel("width")
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].set_ylabel("mean |x_t|" if stat == "act" else "mean |x_t - x_0|")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=8, title=f"modules (worst {len(labels)})")
    fig.suptitle(f"coord-check: {s.parametrization}, {s.optimizer}, lr {s.lr:g} - verdict {res.verdict}",
                 color="red" if res.verdict == "blowup" else "black")
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / (4.2 * ncol + 2.5), 0.96))

    def w(tmp):
        fig.savefig(tmp, format="png", dpi=110)
    try:
        write_via(path, w)
    finally:
        plt.close(fig)


def coord_check_command(recipe: Recipe, widths: Optional[str] = None, steps: Optional[int] = None,
                        seeds: Optional[int] = None, lr: Optional[float] = None, optimizer: Optional[str] = None,
                        parametrization: str = "mup", json_path: Optional[Path] = None,
                        plot_path: Optional[Path] = None, device: str = "cpu",
                        console: Optional[Console] = None) -> int:
    """`mutransfer coord-check`: settings, measurement with a progress bar, table, files. Returns the
    exit code: 0 nothing flagged, 1 blowup. Bad input raises UserError before any training."""
    from .experiment import check_recipe, resolve_device, shapes_for

    ws = coord.parse_widths(widths) if widths is not None else None
    s = coord.resolve(recipe, ws, steps, seeds, lr, optimizer, parametrization, resolve_device(device))
    check_output(json_path, "--json", ".json")
    check_output(plot_path, "--plot", ".png")
    check_recipe(recipe)
    for w in s.widths:                # every width builds (on the meta device) before anything trains
        shapes_for(recipe, w)
    with progress(s) as on_run:   # finished runs are kept in runs/<name>/coord-check/: a rerun resumes
        res = coord.run(recipe, s, on_run, cache_dir=Path("runs") / recipe.name / "coord-check")
    render(res, console)
    if json_path:
        write_json(res, json_path)
    if plot_path:
        plot(res, plot_path)
    return 1 if res.verdict == "blowup" else 0
