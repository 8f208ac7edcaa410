"""Coordinate-check output: the rich table, the PNG and the JSON file, plus the progress bar."""
from __future__ import annotations

import contextlib
import json
import math
import zlib
from pathlib import Path
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..atomic import write_via
from ..console import PlainLines, literal, make_console
from ..outputs_guard import marker
from ..run import coord
from ..run.coord import BLOWUP_SLOPE, VANISH_SLOPE, Result, Settings, to_json

COLOURS = {"ok": "green", "blowup": "bold red", "vanishing": "yellow", "mis-scaled": "bold magenta",
           "inconclusive": "bold yellow"}


@contextlib.contextmanager
def progress(s: Settings, console: Optional[Console] = None) -> Iterator:
    """A rich progress bar over widths x seeds; yields the on_run(width, seed) callback."""
    total = len(s.widths) * s.seeds
    with Progress(TextColumn("coord-check"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console or make_console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"{s.axis} {s.widths[0]}", total=total)
        plain = PlainLines(bar.console, "coord-check: runs", total)
        count = [0]

        def on_run(width: int, seed: int) -> None:
            count[0] += 1
            bar.update(task, advance=1, description=f"{s.axis} {width} seed {seed} done")
            plain.update(count[0], f"({s.axis} {width} seed {seed})")
        yield on_run


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else ("-inf" if x == -math.inf else f"{x:+.2f}")


def note(row) -> str:
    if row.flag == "blowup":
        return "grows with width"
    if row.flag == "vanishing":
        return "updates shrink with width (kernel-like)"
    if row.flag == "mis-scaled":
        return "norm departs from √(fan_out/fan_in)"
    return row.why


def render(res: Result, console: Optional[Console] = None, limit: Optional[int] = None) -> None:
    """The table, worst slope first, then the verdict line."""
    if console is None:
        console = make_console()
    s = res.settings
    t = Table(title=f"coord-check ({s.parametrization}, {s.optimizer}, lr {s.lr:g}, {s.steps} steps, "
                    f"{s.seeds} seed{'s' * (s.seeds > 1)}): values at t = {s.steps}")
    t.add_column("module", no_wrap=True)
    t.add_column("stat", no_wrap=True)
    for w in s.widths:
        t.add_column(f"{'d' if s.depth_width else 'w'}={w}", justify="right")
    t.add_column("slope", justify="right")
    t.add_column(f"± {coord.Z:g} se", justify="right")
    t.add_column("verdict", no_wrap=True)
    rows = res.worst_first
    for r in rows[:limit] if limit else rows:
        c = COLOURS[r.flag]
        unc = "-" if r.se != r.se or not math.isfinite(r.slope) else f"{coord.Z * r.se:.2f}"
        t.add_row(literal(r.name), r.statistic, *(f"{v:.3g}" for v in r.values), _fmt(r.slope), unc,
                  f"[{c}]{r.flag}[/]")
    console.print(t)
    for d in res.diverged:
        console.print(f"[bold red]diverged[/] {literal(d)}", highlight=False)
    for f in res.findings:
        console.print(f"[bold red]attention[/] {literal(f)}", highlight=False)
    for n in res.notes:
        console.print(f"[cyan]regime change[/] {literal(n)}", highlight=False)
    ns = sum(r.flag == "mis-scaled" for r in res.rows)
    if ns:
        console.print(f"[bold magenta]mis-scaled[/]: {ns} parameter norm(s) (‖W₀‖ at init, the update ‖ΔW·x‖ on the "
                      "probe inputs (or ‖ΔW‖), divided by √(fan_out/fan_in) of the traced layout) move with width: "
                      f"slope beyond ±{coord.SPECTRAL_SLOPE:.2f} by more than the uncertainty", highlight=False)
    nb = sum(r.flag == "blowup" for r in res.rows)
    nv = sum(r.flag == "vanishing" for r in res.rows)
    incon = [r for r in res.worst_first if r.flag == "inconclusive"]
    if nv:
        console.print("[yellow]vanishing[/]: updates that shrink with width, as in the kernel regime: some "
                      "layer's LR scaling is too small, or (often at small widths with a large LR or many "
                      "steps) the narrow models move more than the limit; compare t = 1 (--json series). "
                      "Shrinking act (muP readouts, 1/d attention logits at init) is expected and not flagged.",
                      highlight=False)
    for r in incon[:5]:
        console.print(f"[bold yellow]inconclusive[/] {r.name} {r.statistic}: {r.why}", highlight=False)
    band = f"slope ± {coord.Z:g} standard errors (seeds and fit)"
    if res.verdict == "ok":
        console.print(f"[green]verdict: ok[/] (no slope above {BLOWUP_SLOPE:+.2f} that keeps growing; {band})"
                      + (f"; [yellow]{nv} vanishing-update warning(s)[/] (slope below {VANISH_SLOPE:+.2f})" if nv else ""))
    elif res.verdict == "inconclusive":
        console.print(f"[bold yellow]verdict: {res.verdict_line}[/] ({len(incon)} row(s) whose {band} straddles "
                      f"the threshold; nothing confidently wrong)", highlight=False)
    else:
        why = [f"{nb} statistic(s) with slope above {BLOWUP_SLOPE:+.2f} beyond the uncertainty"] if nb else []
        why += [f"{ns} mis-scaled parameter(s)"] if ns else []
        why += [f"{len(res.findings)} attention-scale finding(s)"] if res.findings else []
        why += ["a run diverged"] if res.diverged else []
        why += [f"{len(incon)} more inconclusive"] if incon else []
        console.print(f"[bold red]verdict: blowup[/] ({', '.join(why)})")


def write_json(res: Result, path: Path) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(to_json(res), f, indent=1)
            f.write("\n")
    write_via(path, w)


def _extra_panels(res: Result, axes, colour: dict, legend: set) -> list:
    """The last column: attention logits (act, update at the last step) on top, the spectral
    check (norm / √(fan_out/fan_in), init and update) below."""
    s = res.settings
    top, bottom = axes[0][-1], axes[1][-1]
    for r in res.rows:
        if r.name.endswith(":attn-logits"):
            ax, ys = top, r.values
        elif r.statistic in coord.SPECTRAL_STATS:
            ax, ys = bottom, r.values
        else:
            continue
        pts = [(w, y) for w, y in zip(s.widths, ys) if y == y and math.isfinite(y) and y > 0]
        if len(pts) < 2:
            continue
        bad = r.flag in ("blowup", "mis-scaled")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if r.statistic == "‖W₀‖" else "--", marker="o", ms=3,
                lw=2.6 if bad else 0.9, color=colour.get(r.name, "grey"), label=r.name if r.name in legend else None)
    top.set_title("attention logits (act —, update --)" + (" ⚠ scale" if res.findings else ""), fontsize=10,
                  color="red" if res.findings else "black")
    bottom.set_title("spectral: ‖W₀‖ —, update ‖ΔW·x‖/‖x‖ -- ÷ √(fan_out/fan_in)", fontsize=10)
    for ax in (top, bottom):
        if not ax.lines:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(s.widths))
        ax.set_xticklabels([str(w) for w in s.widths])
        ax.set_xlabel("width")
        ax.grid(True, which="both", alpha=0.3)
    return [top, bottom]


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
    fig, axes = plt.subplots(2, ncol + 1, figsize=(4.2 * (ncol + 1) + 2.5, 7.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    names = list(dict.fromkeys(r.name for r in res.worst_first))
    # a module keeps its colour in every plot (muP and SP of the same model): hashed from its name
    colour = {n: cmap(zlib.crc32(n.encode()) % 20) for n in names}
    flagged = [r.name for r in res.worst_first if r.flag != "ok"]
    worst = set(dict.fromkeys(flagged + names)) if len(flagged) >= max_legend else set(
        list(dict.fromkeys(flagged + names))[:max_legend])
    for i, stat in enumerate(("act", "update")):
        rows = [r for r in res.rows if r.statistic == stat and not r.name.endswith(":attn-logits")]
        for j in range(ncol):
            ax = axes[i][j]
            if j >= len(cols[stat]):
                if j < ncol:
                    ax.axis("off")
                continue
            t = cols[stat][j]
            for r in rows:
                ys = [ser[t] for ser in r.series]
                pts = [(w, y) for w, y in zip(s.widths, ys) if y == y and math.isfinite(y) and y > 0]
                if len(pts) < 2:
                    continue
                lw, style = ((2.6, "-") if r.flag in ("blowup", "mis-scaled")
                             else ((1.6, "--") if r.flag in ("vanishing", "inconclusive") else (0.9, ":")))
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
    extra = _extra_panels(res, axes, colour, worst)
    handles, labels = [], []
    for ax in list(axes.flat) + extra:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=8, title=f"modules (worst {len(labels)})")
    fig.suptitle(f"coord-check: {s.parametrization}, {s.optimizer}, lr {s.lr:g}, {s.seeds} seed(s) - verdict "
                 f"{res.verdict_line}", color={"blowup": "red", "inconclusive": "darkorange"}.get(res.verdict, "black"))
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / (4.2 * (ncol + 1) + 2.5), 0.96))

    def w(tmp):
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": marker("coord-check plot")})
    try:
        write_via(path, w)
    finally:
        plt.close(fig)
