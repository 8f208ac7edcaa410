"""The command line: parse flags, call one function per command, map errors to exit codes. No logic.

Exit codes: 0 success, 1 the work itself failed (blowup flagged, every trial diverged, NaN loss),
2 bad input (recipe, flags, factories, data), 130 interrupted.
"""
from __future__ import annotations

import errno
import functools
import inspect
import os
import typing
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from .commands.tune_options import TuneOptions
from .console import clean, literal, make_console, print_error
from .errors import UserError
from .flags import at_least
from .signals import terminate_raises

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="muTransfer by the spectral rule: tune on a narrow proxy, transfer zero-shot to a wide target.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            v = version("mutransfer")
        except PackageNotFoundError:
            from . import __version__ as v
        print(f"mutransfer {v}")
        raise typer.Exit(0)


_VERBOSE = [False]       # --verbose: third-party warnings shown as they come (quiet.py)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit"),
          verbose: bool = typer.Option(False, "--verbose", help="show third-party warnings (default: one line "
                                       "counting them)")):
    """muTransfer by the spectral rule: tune on a narrow proxy, transfer zero-shot to a wide target."""
    _VERBOSE[0] = verbose


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            from .quiet import collected
            with terminate_raises(), collected(_VERBOSE[0]):
                from .threads import configure
                configure()           # threads from the CPUs this process may use (affinity), not the machine's
                return fn(*a, **kw)
        except UserError as e:
            print_error(err, e.where, e.message)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG, errno.EPERM):
                where = getattr(e, "filename", None) or "output"
                print_error(err, str(where), f"{os.strerror(e.errno)}; what finished before is kept")
                raise typer.Exit(2)
            raise
    return wrapper


def _recipe(path: Path):
    from .run.recipe import load_recipe

    return load_recipe(path)


def _typer_params(options_cls) -> list[inspect.Parameter]:
    """Typer's parameters generated from an options dataclass (flags.py): its fields' types, defaults and
    help; the bounds are checked by the command itself (flags.validate), for the Python API too."""
    from .flags import cli_name, declared

    hints = typing.get_type_hints(options_cls)
    params = []
    for f, meta in declared(options_cls):
        ann, default = hints[f.name], f.default
        if typing.get_origin(ann) is tuple:               # repeatable: a list on the command line
            ann, default = list[typing.get_args(ann)[0]], list(default)
        if meta.argument:
            info = typer.Argument(..., help=meta.help)
        else:
            info = typer.Option(default, cli_name(f, meta), help=meta.help)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=ann))
    return params


def options_command(name: str, options_cls, run: Callable[[object], int], doc: str):
    """Register command `name`: its flags are the fields of `options_cls`; `run(options)` is its exit code."""
    def command(**kw):
        code = run(options_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}))
        if code:
            raise typer.Exit(code)

    command.__signature__ = inspect.Signature(_typer_params(options_cls))
    command.__doc__ = doc
    command.__name__ = name
    app.command(name)(handle_errors(command))


def _tune(opts) -> int:
    from .commands.tuning import tune_command

    return tune_command(opts)[0]


options_command("tune", TuneOptions, _tune,
                "Optuna search of LR and init multipliers on the proxy, under muP (resumable, parallel).")


@app.command()
@handle_errors
def scale(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    hparams: Optional[Path] = typer.Option(None, help="tuned hparams file (default runs/<name>/hparams.yaml)"),
    width: Optional[int] = typer.Option(None, help="target width (default: widths.target)"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: target.steps or "
                                        "target.tokens_per_param, else train.steps)"),
    batch_size: Optional[int] = typer.Option(None, help="global batch size (default: target.batch_size, else "
                                             "train.batch_size)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model"),
    fsdp: bool = typer.Option(False, "--fsdp", help="FSDP2 under torchrun (default DDP)"),
    checkpoint_every: int = typer.Option(0, help="checkpoint every N steps (0: only at the end)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint"),
    out: Optional[Path] = typer.Option(None, help="run directory (default runs/<name>/scale-<width>/)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the per-parameter plan and cost; train nothing"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="with --dry-run: write the plan as JSON"),
    log: list[str] = typer.Option([], "--log", help="tensorboard | wandb | csv (repeatable): also log there"),
    depth: Optional[int] = typer.Option(None, help="target depth (recipes with depths:; default depths.target)"),
):
    """Rescale every layer by the spectral rule and train the wide target."""
    from .report.explain import explain, render, write_json

    r = _recipe(recipe)
    w = width if width is not None else r.widths.target
    at_least(w, 1, "--width")
    if dry_run:
        from .commands.scale import resolve_hparams
        from .outputs_guard import check_output
        check_output(json_path, "--json", "plan", [recipe], ".json")
        if depth is not None or r.depths is not None:
            from .run.experiment import at_depth
            r = at_depth(r, depth if depth is not None else r.depths.target)
        src = resolve_hparams(r, str(hparams) if hparams else None)    # exactly as the run resolves them
        from .commands.scale import horizon_lines, horizon_of
        from .run.experiment import target_run
        hz = horizon_of(r, src, *target_run(r, w, steps, batch_size))     # bad input fails before any output
        make_console(highlight=False).print(f"[bold]hparams[/]: {literal(src.source)}")
        for line in horizon_lines(hz, r, src.hparams):
            make_console(highlight=False).print(line)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan, shapes, cost = explain(r, w, src.hparams, base_width=src.base_width, base_depth=src.base_depth,
                                         horizon=hz)
        render(plan, cost, shapes.unknown)
        if json_path:
            write_json(plan, cost, json_path)
        return
    from .commands.scale import ScaleOptions, run_scale

    res = run_scale(ScaleOptions(str(recipe), str(hparams) if hparams else None, w, steps, device=device,
                                 compile=compile, fsdp=fsdp, checkpoint_every=checkpoint_every, resume=resume,
                                 out=str(out) if out else None, log=tuple(log), depth=depth, batch_size=batch_size))
    if res.exit_code:
        raise typer.Exit(res.exit_code)


@app.command()
@handle_errors
def predict(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    hparams: Optional[Path] = typer.Option(None, help="tuned hparams file; the prediction is written into it "
                                                      "(default runs/<name>/hparams.yaml)"),
    widths: Optional[str] = typer.Option(None, help="the ladder, comma-separated, e.g. 64,128,256 (default: "
                                                    "halvings of the target within --budget)"),
    width: Optional[str] = typer.Option(None, help="target width(s), comma-separated (default: widths.target)"),
    seeds: int = typer.Option(2, help="seeds per ladder width"),
    fit_on: str = typer.Option("params", help="the fit's variable: params | compute | width"),
    budget: float = typer.Option(0.25, help="default ladder: at most this fraction of the target run's compute"),
    rungs: int = typer.Option(3, help="default ladder: this many widths (>= 3)"),
    steps: Optional[int] = typer.Option(None, help="training steps of every run (default: as scale decides them "
                                                   "per width: target: section, else train.steps)"),
    batch_size: Optional[int] = typer.Option(None, help="batch size of every run (default: as scale)"),
    level: float = typer.Option(0.95, help="the interval's coverage"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    plot: Optional[Path] = typer.Option(None, help="PNG (default runs/<name>/predict/prediction.png)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the prediction as JSON"),
    depth: Optional[int] = typer.Option(None, help="target depth (recipes with depths:; default depths.target)"),
):
    """Predict the target's validation loss from a ladder of narrower widths (E + A·x^-α, with an interval)."""
    from .commands.predict import PredictOptions, run_predict

    res = run_predict(PredictOptions(str(recipe), str(hparams) if hparams else None, widths, width, seeds, fit_on,
                                     budget, rungs, steps, batch_size, level, device, str(plot) if plot else None,
                                     str(json_path) if json_path else None, depth=depth))
    if res.exit_code:
        raise typer.Exit(res.exit_code)


@app.command("coord-check")
@handle_errors
def coord_check(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    widths: Optional[str] = typer.Option(None, help="comma-separated widths, e.g. 64,128,256,512"),
    steps: Optional[int] = typer.Option(None, help="training steps measured (t = 0..N)"),
    seeds: Optional[int] = typer.Option(None, help="seeds averaged"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: the recipe's)"),
    optimizer: Optional[str] = typer.Option(None, help="sgd | adam | adamw (default: the recipe's)"),
    parametrization: str = typer.Option("mup", help="mup | sp (the control)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the measurements and verdict as JSON"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG, one panel per statistic"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: a GPU when there is one)"),
    depths: Optional[str] = typer.Option(None, help="comma-separated depths: a depth ladder at a fixed width"),
    width: Optional[int] = typer.Option(None, help="with --depths: the fixed width (default widths.proxy)"),
):
    """Train at several widths for a few steps and flag activations or updates that blow up."""
    from .commands.coord_check import coord_check_command

    code = coord_check_command(_recipe(recipe), widths, steps, seeds, lr, optimizer, parametrization,
                               json_path, plot, device, depths=depths, width=width)
    if code:
        raise typer.Exit(code)


@app.command()
@handle_errors
def sweep(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    widths: Optional[str] = typer.Option(None, help="comma-separated widths (default: proxy, 2x proxy, ... target)"),
    lrs: Optional[str] = typer.Option(None, help="comma-separated values of the swept parameter (LRs by default)"),
    lr_range: Optional[str] = typer.Option(None, help="LOW:HIGH:POINTS, log-spaced raw values, e.g. 1e-4:1e-1:8"),
    param: Optional[str] = typer.Option(None, help="sweep this tunable multiplier instead of lr"),
    parametrization: Optional[str] = typer.Option(None, help="mup | sp | both (default both)"),
    seeds: Optional[int] = typer.Option(None, help="seeds averaged per grid point"),
    steps: Optional[int] = typer.Option(None, help="training steps per point (default sweep.steps or train.steps)"),
    batch_size: Optional[int] = typer.Option(None, help="batch size (default sweep.batch_size or train.batch_size)"),
    workers: int = typer.Option(1, help="parallel worker processes"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: a GPU when there is one)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write results, optima and drift as JSON"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG, one panel per parametrization"),
    log: list[str] = typer.Option([], "--log", help="tensorboard | wandb | csv (repeatable): grid points there too"),
    depths: Optional[str] = typer.Option(None, help="comma-separated depths: sweep LR x depth at a fixed width"),
    width: Optional[int] = typer.Option(None, help="with --depths, --horizons or --batch-sizes: the fixed width "
                                        "(default widths.proxy)"),
    horizons: Optional[str] = typer.Option(None, help="comma-separated steps: sweep LR x horizon at a fixed width, "
                                           "the horizon rule against none (--steps is the proxy's horizon)"),
    batch_sizes: Optional[str] = typer.Option(None, help="comma-separated batch sizes: sweep LR x batch size, the "
                                              "batch rule against none (--batch-size is the proxy's)"),
    equal: Optional[str] = typer.Option(None, help="with --batch-sizes: steps (default) or samples held equal"),
):
    """Loss against LR at several widths, muP and SP: does the optimum stay put? (cached per point)"""
    from .commands.sweep import sweep_command

    code = sweep_command(recipe, widths, lrs, lr_range, param, parametrization, seeds, steps, batch_size,
                         workers, device, json_path, plot, log=tuple(log), depths=depths, width=width,
                         horizons=horizons, batch_sizes=batch_sizes, equal=equal)
    if code:
        raise typer.Exit(code)


@app.command("init")
@handle_errors
def init_cmd(
    spec: str = typer.Argument(..., help="hf:<model_type> (e.g. hf:llama) or package.module:function"),
    out: Optional[Path] = typer.Option(None, help="recipe file to write (default <name>.yaml)"),
    width: int = typer.Option(64, help="proxy width"),
    target: Optional[int] = typer.Option(None, help="target width (default 4 x --width)"),
    depth: int = typer.Option(2, help="layers"),
    vocab: int = typer.Option(256, help="vocabulary size (the token data's)"),
    seq_len: int = typer.Option(64, help="sequence length"),
    head_dim: Optional[int] = typer.Option(None, help="d_head, fixed across widths (default: chosen from --width)"),
    kv_groups: int = typer.Option(1, help="query heads per key/value head (architectures with GQA)"),
    width_arg: str = typer.Option("width", help="the factory's width keyword (package.module:function)"),
    name: Optional[str] = typer.Option(None, help="recipe name (default from the spec)"),
):
    """Write a first, commented recipe by inspecting an architecture's config or a factory."""
    from .commands.init import init_command

    init_command(spec, out, width, target, depth, vocab, seq_len, head_dim, kv_groups, width_arg, name)


@app.command("export")
@handle_errors
def export_cmd(
    run: Path = typer.Argument(..., help="a scale run folder (runs/<name>/scale-<width>)"),
    out: Path = typer.Argument(..., help="folder to write model.pt and config.json into"),
    checkpoint: Optional[str] = typer.Option(None, help="checkpoint file (default: the newest)"),
):
    """Write the trained target as a plain state_dict + config.json, usable without mutransfer."""
    from .commands.trained import export

    folder, notes = export(run, out, checkpoint)
    for n in notes:
        print(f"note: {clean(n)}")
    print(clean(f"wrote {folder / 'model.pt'} and {folder / 'config.json'}"))


def _is(e: BaseException, name: str) -> bool:
    """Whether `e` is click's exception `name` (typer vendors click, so match by class name)."""
    return any(c.__name__ == name for c in type(e).__mro__)


def main(argv: Optional[list[str]] = None) -> None:
    """The console script: usage errors (a bad flag value, an unknown option) are one line naming the
    flag and the value, exit 2, instead of click's boxed help."""
    import sys

    try:
        rv = app(args=argv, standalone_mode=False)
    except Exception as e:  # noqa: BLE001 - click's exceptions, matched by name
        if _is(e, "NoArgsIsHelpError"):
            print(e.format_message() if hasattr(e, "format_message") else str(e))
            raise SystemExit(0) from None
        if _is(e, "UsageError"):
            param = getattr(e, "param", None)
            opts = getattr(param, "opts", None) if param is not None else None
            where = "/".join(opts) if opts else (getattr(param, "name", None) or "usage")
            msg = " ".join(e.format_message().split())
            args = list(sys.argv[1:] if argv is None else argv)
            for o in opts or []:
                given = [args[i + 1] for i, a in enumerate(args[:-1]) if a == o] + \
                        [a.split("=", 1)[1] for a in args if a.startswith(o + "=")]
                if given and repr(given[-1]) not in msg:
                    msg += f" (got {given[-1]!r})"
            print(f"error: {where}: {msg} (see --help)", file=sys.stderr)
            raise SystemExit(2) from None
        if _is(e, "Abort"):
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        if _is(e, "Exit"):
            raise SystemExit(getattr(e, "exit_code", 0)) from None
        raise
    raise SystemExit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
