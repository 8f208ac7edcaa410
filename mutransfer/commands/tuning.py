"""`mutransfer tune`: an Optuna search of the tunables on the proxy, under muP.

Trials run in groups (batched_trials.py): a worker asks Optuna for up to `--parallel-trials` trials,
builds each at the proxy width with its values (and each of search.seeds), stacks them into one
TrialBatch and trains them together with THE training loop; each trial reports its validation loss
every `search.report_every` steps and is pruned on its own. The trial's value is the final validation
loss, averaged over seeds. A trial that diverges (NaN/inf, or a training loss above
search.divergence_factor x its first value) is COMPLETE with a finite penalty, divergence_factor x its
validation loss at initialisation, and the user attribute `diverged`, so the sampler learns the region
is bad. One trial at a time is a group of one: the same code.

`--trials N` counts finished trials (complete or pruned) in the storage, whoever ran them: a worker
asks for one more trial only while finished + running < N (recounted before each ask), so one worker
ends with exactly N and K concurrent workers with at most N + K - 1. Trials of dead workers are
failed by heartbeat (study.py).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..console import MeanEta, PlainLines, clean, literal, make_console
from ..engine.hparams import HParams
from ..errors import UserError
from ..flags import validate
from ..outputs_guard import check_output
from ..report.loggers import Loggers, check_kinds
from ..run import experiment
from ..run.batched_trials import Outcome, choose_parallel, precision, probe, run_group
from ..run.hparams_file import default_path, write_hparams_file
from ..run.recipe import Recipe, load_recipe
from ..run.search import (
    check_comparable,
    check_sampler,
    check_space,
    create_study,
    pruner_for,
    sampler_for,
    seeded,
    suggest,
)
from ..run.study import (
    Heartbeat,
    ask_owned,
    check_journal_file,
    count_finished,
    default_storage,
    fail_stale,
    journal_path,
    owning,
    release_connections,
    storage_file,
)
from ..signals import available_cpus, worker_signals
from ..threads import choose as threads_choose
from ..threads import configure as threads_configure
from .tune_options import TuneOptions

# ---------------------------------------------------------------- options ---------------------------------

def make_options(recipe: Recipe, opts: TuneOptions) -> TuneOptions:
    """The options with every default filled from the recipe and the machine, validated (UserError
    naming the flag or field) before any study or file is touched."""
    validate(opts)
    workers, device = opts.workers, experiment.resolve_device(opts.device)
    if device.startswith("cuda"):
        gpus = torch.cuda.device_count()
        if workers > max(1, gpus) * 8:
            raise UserError("--workers", f"{workers} workers for {gpus} GPU(s): at most 8 per GPU")
    elif workers > available_cpus():
        raise UserError("--workers", f"{workers} workers but only {available_cpus()} CPUs are available to this process")
    if opts.study_name is not None and not opts.study_name.strip():
        raise UserError("--study-name", "must not be empty")
    st = opts.storage or default_storage(recipe.name)
    if st.startswith("journal:"):
        check_journal_file(journal_path(st))     # before any lock or file is created next to it
    out = opts.out or default_path(recipe.name)
    protect = [Path(opts.recipe), storage_file(st)]
    check_output(out, "--out", "hparams", protect)
    check_output(opts.plot, "--plot", "tune plot", protect, suffix=".png")
    check_space(recipe.search.params, f"{recipe.path or 'recipe'}: search.params", HParams.from_train(recipe.train))
    check_sampler(recipe.search.sampler)
    return replace(
        opts, recipe=str(opts.recipe), trials=opts.trials or recipe.search.trials,
        width=opts.width or recipe.widths.proxy, storage=st, study_name=opts.study_name or recipe.name,
        out=str(out), plot=None if opts.plot is None else str(opts.plot),
        threads=opts.threads or (threads_choose(workers) if workers > 1 else None),
        log=tuple(check_kinds(list(opts.log))), depth=_tune_depth(recipe, opts.depth), device=device,
    )


def worker_device(device: str, worker: int) -> str:
    """Worker k's device: with several GPUs, one GPU per worker (round robin)."""
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{worker % torch.cuda.device_count()}"
    return device


def _tune_depth(recipe: Recipe, depth: Optional[int]) -> Optional[int]:
    if depth is None:
        return recipe.depths.proxy if recipe.depths is not None else None
    if recipe.depths is None:
        raise UserError("--depth", "the recipe has no depths: section")
    return depth


def recipe_for(opts: TuneOptions, recipe: Recipe) -> Recipe:
    """The recipe at the depth being tuned (itself without depths:)."""
    return experiment.at_depth(recipe, opts.depth) if opts.depth is not None else recipe


# ---------------------------------------------------------------- study ----------------------------------

# what a study records about its trials, and the flag or field that sets each
STUDY_ATTRS = {"width": "--width", "steps": "train.steps", "optimizer": "train.optimizer", "seeds": "search.seeds"}


def open_study(opts: TuneOptions, recipe: Recipe, worker: int = 0) -> optuna.Study:
    """Create or load the study; refuse to mix trials from another width, step count, optimizer or seeds."""
    want = {"width": opts.width, "steps": recipe.train.steps, "optimizer": recipe.train.optimizer,
            "seeds": recipe.search.seeds}
    if opts.depth is not None:
        want["depth"] = opts.depth
    study, have = create_study(opts.storage, opts.study_name, recipe.search.heartbeat,
                               pruner_for(recipe, opts.trials), want)
    check_comparable(have, want, STUDY_ATTRS, opts.study_name, opts.storage)
    study.sampler = sampler_for(recipe, opts.trials, seeded(recipe.search.sampler_seed, worker, study))
    return study


# ---------------------------------------------------------------- objective -------------------------------

class Objective:
    """One trial at a time as an Optuna objective (a group of one): for scripts and benchmarks that
    drive a study themselves. Its value is that of `tune`'s trials: the final validation loss, mean
    over search.seeds, a penalty if any seed diverges; optuna.TrialPruned when pruned."""

    def __init__(self, recipe: Recipe, width: int, device: str = "cpu"):
        self.recipe, self.width, self.device = recipe, width, device
        self.base = HParams.from_train(recipe.train)
        self.val = experiment.val_batches(recipe, recipe.train.eval_batches, seed=recipe.train.seed)

    def __call__(self, trial: optuna.Trial) -> float:
        hp = self.base.with_values(suggest(trial, self.recipe.search.params))
        out = run_group(self.recipe, self.width, self.device, [trial], [hp], self.val)[0]
        for k, v in out.attrs.items():
            trial.set_user_attr(k, v)
        if out.state == "pruned":
            raise optuna.TrialPruned(out.message)
        return out.value


# ---------------------------------------------------------------- workers --------------------------------

class Worker:
    """Asks for trials, trains them in groups, tells their outcomes; until the storage holds
    opts.trials finished ones."""

    def __init__(self, opts: TuneOptions, recipe: Recipe, study: optuna.Study, device: str, say=None):
        self.opts, self.recipe, self.study, self.device = opts, recipe, study, device
        self.base = HParams.from_train(recipe.train)
        self.grace = 3 * recipe.search.heartbeat
        self.val: Optional[list] = None          # built at the first group: a finished study needs no data
        self.group_size: Optional[int] = None
        self.vectorise = True
        self.say = say                           # one line for the user (the fallback's reason)

    def _prepare(self) -> None:
        r = self.recipe
        self.val = experiment.val_batches(r, r.train.eval_batches, seed=r.train.seed)
        # the study records where and in what precision its trials ran (each trial says so too)
        for key, value in (("devices", self.device), ("precisions", precision(self.device))):
            have = list(self.study.user_attrs.get(key, []))
            if value not in have:
                self.study.set_user_attr(key, have + [value])
        self.group_size = choose_parallel(r, self.opts.width, self.device, self.opts.trials,
                                          self.opts.parallel_trials or None)
        if self.group_size * r.search.seeds > 1:
            why = probe(r, self.opts.width, self.device)
            if why is not None:
                self.vectorise = False
                if self.say is not None:
                    self.say(f"trials run one at a time: the model cannot be vectorised with torch.func.vmap ({why})")
                self.group_size = 1
        if self.group_size > 1 and self.say is not None:
            how = "given by --parallel-trials" if self.opts.parallel_trials else "chosen from the model's size"
            self.say(f"{self.group_size} trials train at once, stacked ({how}; --parallel-trials 1 for one at a time)")

    def _ask(self, limit: Optional[int] = None) -> list:
        """Up to `limit` (default: the group size) new trials, recounting finished + running before each."""
        asked = []
        while len(asked) < (self.group_size if limit is None else limit):
            running = len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if count_finished(self.study) + running >= self.opts.trials:
                break
            asked.append(ask_owned(self.study))     # ours until told: failed if we stop
        return asked

    def run(self, on_trial: Optional[Callable[[optuna.Study], None]] = None) -> optuna.Study:
        study = self.study
        while True:
            fail_stale(study, self.grace)
            if count_finished(study) >= self.opts.trials:
                return study
            if self.val is None:
                self._prepare()
            trials = self._ask()
            if not trials:          # others' running trials would complete the count: wait for them
                time.sleep(min(1.0, self.recipe.search.heartbeat))
                continue
            self._run(trials, on_trial)

    def _run(self, trials: list, on_trial=None) -> None:
        """Train a group; tell each trial's outcome as soon as it ends (progress and the sampler see it
        then) and put new trials in the places that free up. Interrupted or failed: the trials not
        told yet are FAIL (not counted), as optimize does."""
        told: set[int] = set()
        asked = list(trials)                   # every trial of this run, refills included
        values: dict[int, HParams] = {}
        beat = Heartbeat(self.study, [t._trial_id for t in trials], self.recipe.search.heartbeat)

        def done(trial, out: Outcome) -> None:
            self._tell(trial, out)
            told.add(trial.number)
            if on_trial is not None:
                on_trial(self.study)

        def hp(trial) -> HParams:
            if trial.number not in values:
                values[trial.number] = self.base.with_values(suggest(trial, self.recipe.search.params))
            return values[trial.number]

        def more(k: int) -> list:
            fail_stale(self.study, self.grace)     # a dead worker's trials must not hold places in the count
            new = self._ask(limit=k)
            for t in new:
                asked.append(t)
                beat.add(t._trial_id)
            return [(t, hp(t)) for t in new]

        try:
            with beat:
                self._fitting(trials, [hp(t) for t in trials], done, told, more, hp)
        except BaseException:
            for t in asked:
                if t.number not in told:
                    try:
                        self.study.tell(t, state=TrialState.FAIL)
                    except Exception:  # noqa: BLE001 - the storage may be what failed
                        pass
            raise

    def _fitting(self, trials: list, hps: list, done, told: set, more, hp) -> None:
        """Run the group (refilled by `more` as trials end); when it does not fit in the GPU's memory,
        the trials not told yet in halves (and keep the smaller group size for the next groups)."""
        order = list(trials)                   # run_group's trial order: the group, then its refills

        def ask(k: int) -> list:
            new = more(k)
            order.extend(t for t, _ in new)
            return new

        try:
            run_group(self.recipe, self.opts.width, self.device, trials, hps, self.val, self.vectorise,
                      done=lambda i, out: done(order[i], out), ask=ask)
            return
        except torch.cuda.OutOfMemoryError:
            if len(order) == 1:
                raise
        # outside the except block: the failed group's tensors, held by the traceback, are free now
        left = [t for t in order if t.number not in told]
        if not left:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = (len(left) + 1) // 2
        self.group_size = min(self.group_size, half)
        if self.say is not None:
            self.say(f"a group of {len(left)} trials did not fit in GPU memory; groups of {half} from now on")
        for part in (left[:half], left[half:]):
            if part:
                self._fitting(part, [hp(t) for t in part], done, told, more, hp)

    def _tell(self, trial, out: Outcome) -> None:
        for k, v in out.attrs.items():
            trial.set_user_attr(k, v)
        if out.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, out.value)


def run_worker(opts: TuneOptions, recipe: Recipe, worker: int = 0,
               on_trial: Optional[Callable[[optuna.Study], None]] = None,
               study: Optional[optuna.Study] = None, say=None) -> optuna.Study:
    """Run trials until the storage holds opts.trials finished ones (checked before every ask)."""
    study = study or open_study(opts, recipe, worker)
    with owning(study, opts.storage):     # however this ends, no trial of ours is left RUNNING
        return Worker(opts, recipe, study, worker_device(opts.device, worker), say).run(on_trial)


def _worker_entry(opts_d: dict, worker: int) -> None:
    """A spawned local worker: quiet, one line on a user error, no traceback on Ctrl-C."""
    worker_signals()          # SIGTERM stops it like Ctrl-C; it dies with its parent
    opts = TuneOptions(**opts_d)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    warnings.simplefilter("ignore", UserWarning)
    try:
        say = (lambda m: print(f"tune: {clean(m)}", file=sys.stderr)) if worker == 0 else None
        run_worker(opts, recipe_for(opts, load_recipe(opts.recipe)), worker, say=say)
    except KeyboardInterrupt:
        sys.exit(130)
    except UserError as e:
        print(f"error: worker {worker}: {clean(e)}", file=sys.stderr)
        sys.exit(2)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]tune[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[best]}"),
                    TimeElapsedColumn(), TextColumn("eta"), MeanEta(), console=console, transient=False)


def _best_text(study: optuna.Study) -> str:
    good = converged(study.get_trials(deepcopy=False))
    return f"best val loss {min(t.value for t in good):.4g}" if good else "best val loss -"


def _run_local_workers(opts: TuneOptions, bar: Progress, task, study: optuna.Study,
                       plain: Optional[PlainLines] = None) -> list[int]:
    """Spawn opts.workers processes on the same storage; poll it for the progress bar; their exit codes."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_entry, args=(asdict(opts), i), daemon=False) for i in range(opts.workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=1.0 / len(procs))
            bar.update(task, completed=min(opts.trials, count_finished(study)), best=_best_text(study))
            if plain is not None:
                plain.update(min(opts.trials, count_finished(study)), _best_text(study))
    except KeyboardInterrupt:
        # the interrupt may have landed inside one of our storage reads: drop this process's database
        # connections so that no lock we hold keeps the workers from recording their last trial
        release_connections(study)
        # a terminal's Ctrl-C reached the workers too: give them a moment before signalling them
        # ourselves (a `kill -INT` to this process alone did not), so none gets a second interrupt
        deadline = time.time() + 3
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.time()))
        # SIGINT may be inherited as ignored (a background job): SIGTERM them. An interrupt that lands in a
        # finaliser (e.g. SQLAlchemy's, while a worker is still importing) is swallowed by Python, so a
        # worker still alive is signalled again every few seconds, and killed after 30 s
        end, last = time.time() + 30, 0.0
        while time.time() < end and any(p.is_alive() for p in procs):
            if time.time() - last >= 5:
                last = time.time()
                for p in procs:
                    if p.is_alive():
                        try:
                            os.kill(p.pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
            for p in procs:
                p.join(timeout=0.5)
        killed = [p for p in procs if p.is_alive()]
        for p in killed:
            p.kill()
            p.join(10)
        if killed:        # their trials cannot be told FAIL by their owners: fail them here (owner gone)
            try:
                fail_stale(study, grace_period=float("inf"))
            except Exception:  # noqa: BLE001 - the rerun fails them at once (dead owner) anyway
                pass
        raise
    return [p.exitcode for p in procs]


# ---------------------------------------------------------------- results --------------------------------

def converged(trials: list) -> list:
    """Complete trials that did not diverge (the candidates for the best)."""
    return [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("diverged", False)]


def _table(good: list, n: int = 5) -> Table:
    names = sorted({k for t in good for k in t.params})
    table = Table(title=f"best {min(n, len(good))} of {len(good)} converged trials")
    for c in ["#", "val loss", *names]:
        table.add_column(literal(c), justify="right")
    for t in sorted(good, key=lambda t: t.value)[:n]:
        table.add_row(str(t.number), f"{t.value:.4f}", *(_fmt(t.params.get(k)) for k in names))
    return table


def _fmt(v) -> str:
    return "-" if v is None else (str(v) if isinstance(v, (bool, str)) else f"{v:.4g}")


def finish(opts: TuneOptions, recipe: Recipe, study: optuna.Study, console: Console, interrupted: bool = False) -> int:
    """Summary line, best-trials table, hparams file and plot. 1 when no trial converged."""
    trials = study.get_trials(deepcopy=False)
    good = converged(trials)
    diverged = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("diverged")]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    finished = len(good) + len(diverged) + len(pruned)
    console.print(f"study [bold]{literal(opts.study_name)}[/] ({literal(opts.storage)}): {finished} finished trials - "
                  f"{len(good)} converged, {len(diverged)} diverged, {len(pruned)} pruned; "
                  f"{len(failed)} failed (interrupted or killed, not counted)", highlight=False)
    if not good:
        if finished and not interrupted:
            console.print(f"[red]every trial diverged or was pruned[/] ({len(diverged)} diverged, {len(pruned)} "
                          "pruned): no hparams written. Narrow search.params (e.g. lower the LR range) or raise "
                          "search.divergence_factor.", highlight=False)
            return 1
        return 0
    console.print(_table(good))
    best = min(good, key=lambda t: t.value)
    if opts.log:
        log_trials(opts, study)
    out = write_hparams_file(opts.out, recipe=opts.recipe, proxy_width=opts.width,
                             optimizer=recipe.train.optimizer, hparams=best.params, best_value=best.value,
                             study=opts.study_name, storage=opts.storage, steps=recipe.train.steps,
                             extra={"trials": finished, "batch_size": recipe.train.batch_size,
                                    **({"proxy_depth": opts.depth} if opts.depth else {})})
    console.print(f"best trial #{best.number}: val loss {best.value:.4f} with "
                  + literal(", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()) + f" -> {out}"), highlight=False)
    if recipe.target is not None and recipe.target.measure is not None and not interrupted:
        measure_horizon(opts, recipe, best, finished, study, console)
    if opts.plot:
        from ..report.tune_plot import plot_study

        console.print(f"plot -> {literal(plot_study(study, opts.plot))}", highlight=False)
    return 0


def measure_horizon(opts: TuneOptions, recipe: Recipe, best, finished: int, study: optuna.Study,
                    console: Console) -> None:
    """target.measure: the horizon (and batch) exponent on the proxy around the best trial, into the
    hparams file's `horizon:` section with its cost beside the search's (horizon_measure.py)."""
    from .horizon_measure import measure

    h = measure(recipe, best.params, Path(opts.out).parent, workers=opts.workers, device=opts.device,
                say=lambda m: console.print(m, highlight=False))
    search_s = sum(t.duration.total_seconds() for t in study.get_trials(deepcopy=False) if t.duration is not None)
    h["search_seconds"] = round(search_s, 1)
    console.print(f"measurement cost {h['seconds']:.0f} s, the search's {search_s:.0f} s (trial time)", highlight=False)
    write_hparams_file(opts.out, recipe=opts.recipe, proxy_width=opts.width,
                       optimizer=recipe.train.optimizer, hparams=best.params, best_value=best.value,
                       study=opts.study_name, storage=opts.storage, steps=recipe.train.steps,
                       extra={"trials": finished, "batch_size": recipe.train.batch_size,
                              **({"proxy_depth": opts.depth} if opts.depth else {}), "horizon": h})


def tune(opts: TuneOptions, recipe: Recipe, console: Optional[Console] = None) -> int:
    """Run (or resume) the search until opts.trials finished trials exist; write the outputs. Exit code."""
    console = console or make_console()
    recipe = recipe_for(opts, recipe)
    experiment.check_recipe(recipe)
    experiment.check_fits(recipe, opts.width, "--width")     # before a study is tied to this width
    study = open_study(opts, recipe)            # created (or checked) once, before any worker starts
    done = count_finished(study)
    if done:
        console.print(literal(f"resuming study {opts.study_name!r}: {done} finished trials in {opts.storage}"), highlight=False)
    code = 0
    with _progress(console) as bar:
        task = bar.add_task("tune", total=opts.trials, completed=min(done, opts.trials), best=_best_text(study),
                            start_done=min(done, opts.trials))
        plain = PlainLines(console, "tune: trials", opts.trials, min(done, opts.trials))

        def on_trial(s: optuna.Study) -> None:
            n, best = min(opts.trials, count_finished(s)), _best_text(s)
            bar.update(task, completed=n, best=best)
            plain.update(n, best)

        try:
            if opts.workers == 1:
                run_worker(opts, recipe, 0, on_trial=on_trial, study=study,
                           say=lambda m: bar.console.print(f"[yellow]note[/]: {literal(m)}", highlight=False))
            else:
                codes = _run_local_workers(opts, bar, task, study, plain)
                bad = [c for c in codes if c not in (0, None)]
                if bad:
                    console.print(f"[red]{len(bad)} of {opts.workers} workers failed[/] (exit codes {bad})")
                    code = 2 if 2 in bad else 1
        except KeyboardInterrupt:
            bar.stop()
            console.print("[yellow]interrupted[/]: every finished trial is kept in the storage; "
                          "rerun the same command to continue.")
            finish(opts, recipe, study, console, interrupted=True)
            raise
    if code:
        return code
    fail_stale(study, 3 * recipe.search.heartbeat)
    return finish(opts, recipe, study, console)


def log_trials(opts: TuneOptions, study: optuna.Study) -> None:
    """Every finished trial, in order, to the loggers (in the folder of the hparams file)."""
    lg = Loggers(list(opts.log), Path(opts.out).parent, f"{opts.study_name}-tune", {"width": opts.width})
    best = math.inf
    try:
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
                continue
            vals = {f"param/{k}": v for k, v in t.params.items() if isinstance(v, (int, float))}
            if t.state == TrialState.COMPLETE and not t.user_attrs.get("diverged"):
                best = min(best, t.value)
                vals["trial/val_loss"] = t.value
            vals["trial/best_val_loss"] = best
            vals["trial/diverged"] = float(bool(t.user_attrs.get("diverged")))
            vals["trial/pruned"] = float(t.state == TrialState.PRUNED)
            lg.log(t.number, vals)
    finally:
        lg.close()


def tune_command(opts: TuneOptions, console: Optional[Console] = None) -> tuple[int, TuneOptions]:
    """`tune`, from either front door (the CLI, mutransfer.tune): load and validate, then tune().
    The exit code and the options as resolved (where the hparams file went)."""
    recipe = load_recipe(opts.recipe)
    opts = make_options(recipe, opts)
    if opts.threads and opts.workers == 1:
        threads_configure(1, opts.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tune(opts, recipe, console), opts
