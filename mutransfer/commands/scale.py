"""`mutransfer scale`: train the wide target with the transferred hyperparameters.

    run_scale(ScaleOptions(recipe="recipes/gpt-pysource.yaml", width=1024, ...)) -> ScaleResult

Order of work: everything that can be wrong with the input (recipe, hparams file, flags, data, an
incompatible checkpoint) is checked before anything is written. Then DIR receives the resolved
recipe, the hparams used, the plan (the dry-run JSON) and package versions; the model is built at
the target width relative to the width the hparams were tuned at, wrapped for torch.distributed when
launched by torchrun, and trained by THE loop (train.train) with callbacks for metrics, the progress
bar, checkpoints and signals. At the end the validation loss is compared with the proxy's (TP5:
wider must not be worse).
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from rich.console import Console

from ..atomic import clean_stale_temporaries, write_text
from ..console import literal, make_console
from ..engine.hparams import HParams
from ..engine.parametrize import make_optimizer, param_groups
from ..engine.plan import at_horizon
from ..errors import UserError
from ..flags import at_least, warmup_problem
from ..outputs_guard import check_out_dir, marker
from ..report.explain import estimate_cost, write_json
from ..report.loggers import Loggers, check_kinds
from ..run import checkpoint as C
from ..run import distributed as D
from ..run import experiment
from ..run.hparams_file import apply_hparams_file, default_path, read_hparams_file
from ..run.metrics import LiveProgress, MetricsFile, peak_flops
from ..run.recipe import Recipe, load_recipe, recipe_to_dict
from ..run.train import train


@dataclass
class ScaleOptions:
    recipe: str
    hparams: Optional[str] = None
    width: Optional[int] = None
    steps: Optional[int] = None
    batch_size: Optional[int] = None   # the target's global batch (default target.batch_size, else train's)
    device: str = "auto"
    compile: bool = False
    fsdp: bool = False
    checkpoint_every: int = 0
    resume: bool = False
    out: Optional[str] = None
    runs_dir: str = "runs"
    log: tuple = ()              # --log tensorboard|wandb|csv (loggers.py)
    depth: Optional[int] = None  # target depth (default depths.target; recipes with depths: only)


@dataclass
class ScaleResult:
    exit_code: int
    summary: dict = field(default_factory=dict)


@dataclass
class HParamsSource:
    hparams: HParams
    base_width: int
    source: str                        # human-readable: which file, or the recipe's values
    file: Optional[dict] = None        # the parsed hparams file, if any
    base_depth: Optional[int] = None   # the depth the values were tuned at (recipes with depths:)


def resolve_hparams(recipe: Recipe, path: Optional[str], runs_dir: str = "runs") -> HParamsSource:
    """--hparams PATH, else runs/<name>/hparams.yaml if it exists, else the recipe's base values."""
    base = HParams.from_train(recipe.train)
    if path is None:
        p = default_path(recipe.name, runs_dir)
        if not p.is_file():
            return HParamsSource(base, recipe.widths.proxy, f"the recipe's base values (no {p})", None,
                                 recipe.depths.proxy if recipe.depths is not None else None)
        where = str(p)
    else:
        p, where = Path(path), "--hparams"
        if not p.is_file():
            raise UserError("--hparams", f"file not found: {p}")
    d = read_hparams_file(p)
    hp = apply_hparams_file(base, d, recipe.train.optimizer, f"{where} ({p})" if path is not None else where)
    bw = d["proxy_width"]
    if not isinstance(bw, int) or isinstance(bw, bool) or bw <= 0:
        raise UserError(f"{p}: proxy_width", "must be a positive integer")
    bd = d.get("proxy_depth")
    if recipe.depths is not None and bd is not None and (isinstance(bd, bool) or not isinstance(bd, int) or bd < 1):
        raise UserError(f"{p}: proxy_depth", f"must be a positive integer, got {bd!r}")
    return HParamsSource(hp, bw, f"tuned values from {p}", d, bd if recipe.depths is not None else None)


def transfer_check(val_loss: Optional[float], file: Optional[dict], steps: int,
                   batch: Optional[int] = None, proxy_batch: Optional[int] = None) -> dict:
    """TP5, wider is better: the target's validation loss against the proxy's best. A target that is
    wider *and* trains on at least as many samples (longer, or on bigger batches: the horizon and
    batch rules moved its settings there) must be better still; one that sees fewer cannot be judged."""
    if file is None or file.get("best_value") is None:
        return {"status": "skipped", "message": "no tuned proxy loss to compare with"}
    best = float(file["best_value"])
    p_steps = file.get("steps")
    p_batch = file.get("batch_size") or proxy_batch
    batch = batch or p_batch
    if not isinstance(p_steps, int) or isinstance(p_steps, bool):
        return {"status": "skipped", "proxy": best,
                "message": "the hparams file does not say how many steps the proxy was tuned with: "
                           "losses are not comparable"}
    if p_steps != steps and not (steps >= p_steps and batch and p_batch and steps * batch >= p_steps * p_batch):
        return {"status": "skipped", "proxy": best,
                "message": f"the proxy was tuned with {p_steps} steps, the target ran {steps} (fewer samples): "
                           "losses are not comparable"}
    if batch and p_batch and batch < p_batch and p_steps == steps:
        return {"status": "skipped", "proxy": best,
                "message": f"the target's batch {batch} is below the proxy's {p_batch}: losses are not comparable"}
    if val_loss is None or not math.isfinite(val_loss):
        return {"status": "skipped", "proxy": best, "message": "no final validation loss"}
    if val_loss > best:
        return {"status": "failed", "proxy": best, "target": val_loss,
                "message": f"TRANSFER FAILED: the wider target's validation loss {val_loss:.4f} is WORSE than "
                           f"the proxy's {best:.4f} at the same steps (+{val_loss - best:.4f})"}
    return {"status": "ok", "proxy": best, "target": val_loss,
            "message": f"wider is better: validation loss {val_loss:.4f} <= proxy's {best:.4f} ({val_loss - best:+.4f})"}


def horizon_of(recipe: Recipe, src: HParamsSource, steps: int, batch: int):
    """The horizon and batch factors from the run the hparams were tuned on (the file's steps and
    batch, else the recipe's) to the target's (steps, batch)."""
    f = src.file or {}
    p_steps = f.get("steps") if isinstance(f.get("steps"), int) and f.get("steps", 0) > 0 else None
    p_batch = f.get("batch_size") if isinstance(f.get("batch_size"), int) and f.get("batch_size", 0) > 0 else None
    measured = f.get("horizon") if isinstance(f.get("horizon"), dict) else None
    return experiment.horizon_factors(recipe, steps, batch, p_steps, p_batch, measured)


def horizon_lines(hz, recipe: Recipe, hp: HParams) -> list[str]:
    """What scale and its dry run say about the horizon and batch axes: nothing when the target trains
    as the proxy did, else the factors and, where it applies, the decay warning."""
    if hz.identity and hz.proxy.steps == hz.target.steps and hz.proxy.batch == hz.target.batch:
        return []
    note = decay_note(hz, hp, recipe.train.optimizer)
    return [horizon_line(hz, recipe)] + ([note] if note else [])


def decay_note(hz, hp: HParams, optimizer: str) -> Optional[str]:
    """A warning when the tau rule moves a weight decay the proxy could hardly measure."""
    from ..engine import horizon as H
    if hz.exponent_source == "off" or hz.weight_decay == 1.0 or hp.weight_decay <= 0 or optimizer not in H.DECOUPLED_DECAY:
        return None
    tau = H.decay_timescale(hp.lr, hp.weight_decay, hz.proxy.steps)
    if tau <= 1:
        return None
    return (f"[yellow]note[/]: the proxy's weight decay acts on {tau:.1f}x its run (tau = 1/(lr x wd x steps)), so its "
            "tuned value is barely measured; the tau rule keeps it as weak at the target. Tune the proxy's decay "
            "where tau < 1 (a larger range), or set target.decay: fixed")


def horizon_line(hz, recipe: Optional[Recipe] = None) -> str:
    """One line: what the horizon and batch axes do to the proxy's settings."""
    p, t = hz.proxy, hz.target
    if hz.exponent_source == "off":
        why = ("target.rules is off" if recipe is None or recipe.target is not None else
               "the recipe has no target: section (docs/horizon.md moves them by rule)")
        return (f"[yellow]horizon[/]: {p.steps} -> {t.steps} steps, batch {p.batch} -> {t.batch}; {why}: "
                "the proxy's LR, decay and warmup are kept")
    src = {"measured": "measured on the proxy", "recipe": "from the recipe",
           "default": "the default; not measured on this proxy (target.measure)"}[hz.exponent_source]
    return (f"[bold]horizon[/]: {p.steps} -> {t.steps} steps (LR x{hz.horizon_lr:.3g}, exponent {hz.horizon_exponent:.3g}, "
            f"{src}), batch {p.batch} -> {t.batch} (LR x{hz.batch_lr:.3g}, exponent {hz.batch_exponent:.3g}), "
            f"weight decay x{hz.weight_decay:.3g}, eps x{hz.eps:.3g}, warmup {p.warmup} -> {hz.warmup} steps")


def fingerprint(recipe: Recipe, width: int, src: HParamsSource, world: int, per_rank_batch: int) -> dict:
    """What a checkpoint must agree with to be resumed (steps may change; logging settings may too)."""
    r = recipe_to_dict(recipe)
    t = {k: v for k, v in r["train"].items() if k not in ("steps", "eval_every", "eval_batches", "log_every")}
    return {"model": r["model"], "data": r["data"], "loss": r["loss"], "layouts": r["layouts"], "train": t,
            "width": width, "base_width": src.base_width, "hparams": src.hparams.flat(), "world_size": world,
            "per_rank_batch": per_rank_batch, "depth": experiment.depth_of(recipe), "base_depth": src.base_depth}


def _diff(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if json.dumps(a.get(k), sort_keys=True, default=str)
            != json.dumps(b.get(k), sort_keys=True, default=str)]


def versions() -> dict:
    import mutransfer

    v = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
         "mutransfer": mutransfer.__version__, "cuda": torch.version.cuda,
         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    from importlib.metadata import PackageNotFoundError, version
    for name, dist in (("optuna", "optuna"), ("pydantic", "pydantic"), ("typer", "typer"), ("rich", "rich"),
                       ("yaml", "pyyaml"), ("numpy", "numpy"), ("transformers", "transformers")):
        try:
            v[name] = version(dist)       # package metadata: rich has no __version__ attribute
        except PackageNotFoundError:
            pass
    return v


def run_scale(o: ScaleOptions, console: Optional[Console] = None) -> ScaleResult:
    """Train the target (see _run_scale); the run folder's lock is released however it ends."""
    try:
        return _run_scale(o, console)
    finally:
        for lk in list(RunLock.held):
            lk.release()


def _run_scale(o: ScaleOptions, console: Optional[Console]) -> ScaleResult:
    console = console or make_console()
    recipe = load_recipe(o.recipe)
    if o.depth is not None or recipe.depths is not None:
        recipe = experiment.at_depth(recipe, o.depth if o.depth is not None else recipe.depths.target)
    width = o.width if o.width is not None else recipe.widths.target
    at_least(width, 1, "--width")
    if o.steps is not None and o.steps <= 0:
        raise UserError("--steps", "must be > 0")
    if o.checkpoint_every < 0:
        raise UserError("--checkpoint-every", "must be >= 0")
    if o.batch_size is not None and o.batch_size <= 0:
        raise UserError("--batch-size", "must be > 0")
    steps, batch = experiment.target_run(recipe, width, o.steps, o.batch_size)
    device = experiment.resolve_device(o.device)
    d = D.setup(device)
    try:
        return _run(o, recipe, width, steps, batch, d, console)
    finally:
        D.teardown()


def _run(o: ScaleOptions, recipe: Recipe, width: int, steps: int, batch: int, d: D.Dist,
         console: Console) -> ScaleResult:
    out_console = console if d.main else Console(quiet=True)
    t = recipe.train
    if batch % d.world:
        where = "--batch-size" if o.batch_size is not None else ("target.batch_size" if batch != t.batch_size
                                                                  else "train.batch_size")
        raise UserError(where, f"{batch} is not divisible by the {d.world} processes")
    per_rank = batch // d.world
    src = resolve_hparams(recipe, o.hparams, o.runs_dir)
    hz = horizon_of(recipe, src, steps, batch)
    if warmup_problem(hz.warmup, steps):
        raise UserError("--steps", warmup_problem(hz.warmup, steps)
                        + (f" (train.warmup {t.warmup} moved by the horizon rule)" if hz.warmup != t.warmup else ""))
    if src.base_width > width:
        raise UserError("--width", f"{width} is below the width the hparams were tuned at ({src.base_width})")
    if o.fsdp and not d.enabled:
        raise UserError("--fsdp", "FSDP needs several processes: launch with torchrun --nproc-per-node N")
    if o.fsdp and t.optimizer == "muon":
        raise UserError("--fsdp", "optimizer: muon orthogonalises whole matrices, which FSDP2 shards across "
                        "processes; use DDP (no --fsdp) with muon")
    dep = experiment.depth_of(recipe)
    default_out = Path(o.runs_dir) / recipe.name / (f"scale-{width}" + (f"-d{dep}" if dep is not None else ""))
    out = check_out_dir(Path(o.out) if o.out else default_out, "--out")
    ck_dir = out / "checkpoints"
    for name in SCALE_FILES:      # never overwrite what another command (tune) or the user put there
        f = out / name
        if f.exists() and not _is_ours(f):
            raise UserError("--out", f"{out} holds {name}, which no scale run wrote; choose another --out")
    fp = fingerprint(recipe, width, src, d.world, per_rank)

    # --- everything that can fail on bad input, before anything is written
    log_kinds = check_kinds(list(o.log))
    experiment.shapes_for(recipe, width)
    experiment.check_plan(recipe, width)          # every glob field matches a parameter
    experiment.check_fits(recipe, width, "--width", d.device)
    data = C.Resumable(experiment.data_stream(recipe, "train", t.seed + d.rank, per_rank))
    experiment.check_model_output(recipe, experiment.first_batch(
        C.Resumable(experiment.data_stream(recipe, "train", t.seed + d.rank, per_rank))))
    val = experiment.val_batches(recipe, t.eval_batches, seed=t.seed)
    experiment.check_batches_agree(experiment.first_batch(
        C.Resumable(experiment.data_stream(recipe, "train", t.seed + d.rank, per_rank))), val[0])
    experiment.check_model_output(recipe, val[0], where="data (validation)")
    ckpt, start = None, 0
    newest = C.latest(ck_dir)
    if o.resume and newest is not None:
        try:
            ckpt = C.load(newest)
        except Exception as e:  # noqa: BLE001
            raise UserError(str(newest), f"unreadable checkpoint ({type(e).__name__}: {e})") from None
        bad = _diff(ckpt.get("fingerprint", {}), fp)
        if bad:
            raise UserError("--resume", f"{newest} was made with a different {', '.join(bad)}; "
                                        "use another --out to start a new run")
        start = int(ckpt["step"])
        if start > steps:
            raise UserError("--steps", f"{steps} is below the checkpoint's step {start}")
    elif not o.resume and (newest is not None or (out / "metrics.jsonl").exists()) and not (
            newest is None and _read_summary(out / "summary.json").get("status") == "failed"):
        raise UserError("--out", f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if o.resume and ckpt is not None and start >= steps and (out / "summary.json").exists():
        prior = _read_summary(out / "summary.json")
        if prior.get("status") == "finished":
            out_console.print(f"{out}: already finished ({start} of {steps} steps); nothing to do", highlight=False)
            return ScaleResult(0, prior)
    lock = RunLock(out) if d.main else None
    if lock is not None:
        lock.acquire()      # a second scale on the same folder: one line, exit 2
        clean_stale_temporaries(out)
        clean_stale_temporaries(ck_dir)

    def say(msg: str) -> None:
        out_console.print(msg, highlight=False, soft_wrap=True)

    say(f"[bold]hparams[/]: {literal(src.source)}")
    for line in horizon_lines(hz, recipe, src.hparams):
        say(line)
    if o.resume and ckpt is None:
        say(f"[yellow]--resume[/]: no checkpoint in {literal(ck_dir)}, starting from step 0")
    if ckpt is not None:
        say(f"[bold]resuming[/] from {literal(newest)} (step {start} of {steps})")

    # --- the model: build, wrap, then the optimizer from the muP groups (after sharding)
    pm = experiment.build(recipe, width, src.hparams, device=d.device, base_width=src.base_width,
                          base_depth=src.base_depth, horizon=hz)
    plan = pm.plan
    model, no_sync = D.wrap(pm.model, d, o.fsdp)
    optimizer = make_optimizer(param_groups(D.unwrap(model), plan), recipe.train.optimizer,
                               at_horizon(src.hparams, hz), torch.device(d.device))
    n_params = plan.numel
    if ckpt is not None:
        C.restore(ckpt, model, optimizer, data, d)
        first_loss = ckpt.get("first_loss")
        del ckpt

    # --- the record of the run (rank 0)
    cost = estimate_cost(recipe, plan, width)
    flops_per_sample = cost.flops_per_step / (t.batch_size * t.grad_accum) if cost.flops_per_step else None
    # (estimate_cost counts a step of train.batch_size samples: per sample it holds at any batch)
    peak = peak_flops(d.device)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        write_text(out / "hparams.yaml", yaml.safe_dump(
            {"written_by": marker("scale run"), "source": src.source, "proxy_width": src.base_width, "width": width,
             "proxy_depth": src.base_depth, "depth": experiment.depth_of(recipe), "optimizer": t.optimizer,
             "hparams": src.hparams.flat(), "file": src.file, "horizon": hz.to_json(),
             "hparams_at_target": at_horizon(src.hparams, hz).flat()}, sort_keys=False))
        write_json(plan, cost, out / "plan.json")
        v = versions()
        v.update({"world_size": d.world, "fsdp": o.fsdp, "compile": o.compile, "device": d.device,
                  "written_by": marker("scale run")})
        write_text(out / "versions.json", json.dumps(v, indent=1))
    D.barrier(d)

    cfg = experiment.train_config(recipe, d.device, steps=steps, start_step=start, warmup=hz.warmup)
    forward = torch.compile(model) if o.compile else None
    metrics = MetricsFile(out / "metrics.jsonl", src.hparams.lr, flops_per_sample, peak, d.world, start) if d.main else None
    ckpt_cb = C.Checkpointer(ck_dir, o.checkpoint_every, data, d, {"fingerprint": fp})
    if start:
        ckpt_cb.first_loss = first_loss
    callbacks: list[Any] = [C.StopOnSignal(d)]
    if metrics is not None:
        callbacks += [metrics, LiveProgress(out_console, steps, start, metrics)]
    if d.main and log_kinds:
        callbacks.append(Loggers(log_kinds, out, f"{recipe.name}-scale-{width}",
                                 {"width": width, "proxy_width": src.base_width, **src.hparams.flat()}))
    callbacks.append(ckpt_cb)

    say(f"[bold]scale[/] {literal(recipe.name)}: width {src.base_width} -> {width}, {n_params:,} parameters, "
        f"{steps} steps, global batch {batch * t.grad_accum}, device {d.device}"
        + (f", {d.world} processes ({'FSDP2' if o.fsdp else 'DDP'})" if d.enabled else ""))
    try:
        state = train(model, optimizer, data, cfg, val_batches=val, callbacks=callbacks, forward=forward,
                      no_sync=no_sync)
    except Exception as e:   # bad data, a full disk, a crash mid-run: record it, so a rerun is not blocked
        if d.main:
            reason = (f"{e.where}: {e.message}" if isinstance(e, UserError) else f"{e.filename}: {e.strerror}"
                      if isinstance(e, OSError) else f"{type(e).__name__}: {str(e)[:300]}")
            try:
                write_text(out / "summary.json", json.dumps({"status": "failed", "reason": reason,
                                                             "written_by": marker("scale run")}, indent=1))
            except OSError:
                pass
            if lock is not None:
                lock.release()
        raise

    # --- the outcome
    typical = metrics.typical() if metrics is not None else {}
    summary: dict[str, Any] = {
        "recipe": recipe.name, "width": width, "proxy_width": src.base_width, "parameters": n_params,
        "steps": state.step, "steps_planned": steps, "train_loss": state.loss, "val_loss": state.val_loss,
        "samples_per_s": typical.get("samples_per_s", state.samples_per_s),
        "tokens_per_s": typical.get("tokens_per_s"), "mfu": typical.get("mfu"),
        "batch_size": batch, "horizon": hz.to_json(),
        "hparams": src.source, "out": str(out), "metrics": str(out / "metrics.jsonl"),
        "checkpoints": str(ck_dir), "world_size": d.world, "written_by": marker("scale run"),
    }
    code = 0
    if state.diverged:
        good = C.latest(ck_dir)
        summary["status"] = "diverged"
        summary["reason"] = state.reason
        say(f"[red bold]training stopped[/]: {literal(state.reason)}; "
            + (f"the last good checkpoint is {literal(good)}" if good else "no checkpoint was written (use --checkpoint-every)"))
        code = 1
    elif state.stop == "interrupted":
        summary["status"] = "interrupted"
        say(f"[yellow]interrupted[/] at step {state.step}: checkpoint saved in {literal(ck_dir)}; continue with --resume")
        code = 130
    else:
        summary["status"] = "finished"
        summary["transfer"] = check = transfer_check(state.val_loss, src.file, steps, batch, t.batch_size)
        colour = {"ok": "green", "failed": "red bold", "skipped": "yellow"}[check["status"]]
        say(f"[{colour}]{literal(check['message'])}[/]")
        from .predict_check import check_scale
        summary["prediction"] = pc = check_scale(state.val_loss, src, recipe, width, steps, batch,
                                                 out if d.main else None)
        if pc["status"] != "skipped" or (src.file or {}).get("prediction"):
            say(f"[{ {'ok': 'green', 'missed': 'red bold'}.get(pc['status'], 'yellow')}]{literal(pc['message'])}[/]")
    if d.main:
        write_text(out / "summary.json", json.dumps(_finite(summary), indent=1, default=str, allow_nan=False))
        _print_summary(summary, say)
        if lock is not None:
            lock.release()
    D.barrier(d)     # every rank leaves together: a rank tearing down its process group while another
    return ScaleResult(code, summary)   # still writes made gloo abort ("terminate called ...") now and then


SCALE_FILES = ("recipe.yaml", "hparams.yaml", "plan.json", "versions.json", "summary.json")


def _is_ours(f: Path) -> bool:
    """A file a scale run wrote (its marker), or an earlier run's recipe.yaml / metrics beside one."""
    if f.name == "recipe.yaml":
        return (f.parent / "summary.json").exists() or (f.parent / "versions.json").exists() \
            or (f.parent / "plan.json").exists()
    try:
        head = f.read_bytes()[:1 << 16]
    except OSError:
        return False
    return marker("scale run").encode() in head or (f.name == "plan.json" and marker("plan").encode() in head)


def _read_summary(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _finite(x):
    """NaN / inf become null: summary.json stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


class RunLock:
    """An exclusive lock on a run folder (flock on OUT/.lock), held for the whole run."""
    held: list = []

    def __init__(self, folder: Path):
        self.folder, self.fd = folder, None

    def acquire(self) -> None:
        import fcntl
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            RunLock.held.append(self)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise UserError("--out", f"another scale run is using {self.folder}; wait for it or choose another --out") from None

    def release(self) -> None:
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if self in RunLock.held:
            RunLock.held.remove(self)


def _print_summary(s: dict, say) -> None:
    def f(x, fmt="{:.4f}"):
        return "-" if x is None else fmt.format(x)

    say(f"[bold]summary[/]: {s['parameters']:,} parameters, {s['steps']}/{s['steps_planned']} steps, "
        f"train loss {f(s['train_loss'])}, val loss {f(s['val_loss'])}, "
        + (f"{s['tokens_per_s']:,.0f} tokens/s, " if s.get("tokens_per_s") is not None else "")
        + f"{f(s['samples_per_s'], '{:,.1f}')} samples/s (median over logging intervals)"
        + (f", MFU {100 * s['mfu']:.1f}%" if s.get("mfu") is not None else ""))
    if s.get("transfer", {}).get("status") == "failed":
        say(f"[red bold]{literal(s['transfer']['message'])}[/]")
    if s.get("prediction", {}).get("status") == "missed":
        say(f"[red bold]{literal(s['prediction']['message'])}[/]")
    say(literal(f"metrics: {s['metrics']}  checkpoints: {s['checkpoints']}"))
