"""`scale --dry-run`: the plan at a width, as a rich table and JSON, with the target's cost.

Nothing real is built: shapes come from meta-device models and FLOPs from torch's FlopCounterMode run
on meta tensors (so a 10B target costs no memory)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from .. import atomic
from ..console import literal, make_console
from ..engine import experts as experts_rule
from ..engine.hparams import HParams
from ..engine.outputs import select
from ..engine.parametrize import factory_stds
from ..engine.plan import Plan, make_plan
from ..engine.shapes import build_meta, stack_shape
from ..outputs_guard import marker
from ..run.experiment import data_stream, depth_rule, first_batch, model_args, model_factory, shapes_for
from ..run.recipe import Recipe
from ..run.train import loss_fn


@dataclass
class Cost:
    params: int
    flops_per_step: Optional[float]   # forward + backward, whole optimizer step (all micro-batches)
    memory_bytes: int                 # fp32 weights + grads + optimizer state
    flops_error: Optional[str] = None  # why flops_per_step is None
    flops_note: Optional[str] = None   # how the FLOPs were counted, when not plainly on the meta device


def optimizer_state_floats(optimizer: str, momentum: float) -> int:
    if optimizer in ("adam", "adamw", "muon"):
        return 2          # muon: at most AdamW's two (Muon keeps one momentum buffer)
    return 1 if momentum else 0


def estimate_cost(recipe: Recipe, plan: Plan, width: int) -> Cost:
    n = plan.numel
    mem = n * 4 * (2 + optimizer_state_floats(recipe.train.optimizer, recipe.train.momentum))
    flops = None
    # data mistakes are the user's (UserError, exit 2); only the meta-device trace is best effort
    x, y = first_batch(data_stream(recipe, "train", recipe.train.seed, batch_size=recipe.train.batch_size))
    model = build_meta(model_factory(recipe), width, model_args(recipe))
    note = None
    if any(stack_shape(tuple(p.shape), p.layout) for p in plan.params.values()):
        note = ("stacks of experts counted as the forward pass runs them (each token's top-k experts, up to the "
                "capacity), not every slice")
    try:
        flops = _count_flops(recipe, model, x, y, "meta")
    except Exception as e:  # noqa: BLE001 - an estimate; models with data-dependent control flow may not trace on meta
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        # transformers' MoE experts: grouped_mm has no fp32 meta kernel and the eager loop is
        # data-dependent; the batched_mm implementation runs on meta and does top-k of E per token
        if callable(getattr(model, "set_experts_implementation", None)):
            try:
                model.set_experts_implementation("batched_mm")
                flops = _count_flops(recipe, model, x, y, "meta")
                return Cost(n, flops, mem, None, "experts counted with transformers' batched_mm implementation "
                            "(the top-k experts of each token, not all of them)")
            except Exception:  # noqa: BLE001
                pass
        if n <= CPU_FLOPS_MAX_PARAMS:
            try:
                with torch.device("cpu"):
                    real = model_factory(recipe)(width=width, **model_args(recipe))
                flops = _count_flops(recipe, real, x, y, "cpu")
                return Cost(n, flops, mem, None, f"counted on the CPU with one real batch (on meta: {err})")
            except Exception:  # noqa: BLE001
                pass
        return Cost(n, None, mem, err)
    return Cost(n, flops, mem, None, note)


# a model that fails on the meta device is counted for real on the CPU up to this size
CPU_FLOPS_MAX_PARAMS = 50_000_000


def _count_flops(recipe: Recipe, model, x, y, device: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    xm, ym = _to(x, device), _to(y, device)
    with FlopCounterMode(display=False) as fc:
        out = select(model(xm), recipe.model.output)
        loss_fn(recipe.loss, out, ym).backward()
    return float(fc.get_total_flops()) * recipe.train.grad_accum


def _to(x, device):
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x.to(device) if hasattr(x, "to") else x


def explain(recipe: Recipe, width: int, hparams: Optional[HParams] = None, parametrization: str = "mup",
            base_width: Optional[int] = None, base_depth: Optional[int] = None, horizon=None):
    """The plan `scale` would use at `width` (and the recipe's depth), relative to base_width (default
    widths.proxy) and base_depth (default depths.proxy)."""
    hp = hparams or HParams.from_train(recipe.train)
    shapes = shapes_for(recipe, width, base_width)
    plan = make_plan(shapes, hp, recipe.train.optimizer, parametrization, recipe.factory_init,
                     depth_rule(recipe, base_depth), tuple(recipe.train.muon_params), horizon)
    plan.notes.extend(replaced_init_notes(recipe, plan))
    plan.notes.extend(moe_notes(recipe, plan, width))
    return plan, shapes, estimate_cost(recipe, plan, width)


def moe_info(model) -> Optional[tuple[int, int, bool]]:
    """(experts, experts per token, gates renormalised) of a mixture-of-experts model: the built-in
    moe-gpt's MoE layers, or a transformers config (num_experts / num_local_experts / n_routed_experts,
    num_experts_per_tok, norm_topk_prob); None for anything else."""
    from ..models.moe import MoE

    for m in model.modules():
        if isinstance(m, MoE):
            return m.experts, m.top_k, m.normalize
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    e = next((getattr(cfg, f) for f in ("num_experts", "num_local_experts", "n_routed_experts")
              if isinstance(getattr(cfg, f, None), int)), None)
    k = getattr(cfg, "num_experts_per_tok", None)
    if not isinstance(e, int) or not isinstance(k, int) or not 1 <= k <= e:
        return None
    return e, k, bool(getattr(cfg, "norm_topk_prob", True))


def moe_notes(recipe: Recipe, plan: Plan, width: int) -> list[str]:
    """What the dry run says about a mixture of experts (engine/experts.py, docs/moe.md)."""
    stacked = [p for p in plan.params.values() if stack_shape(tuple(p.shape), p.layout)]
    try:
        info = moe_info(build_meta(model_factory(recipe), width, model_args(recipe)))
    except Exception:  # noqa: BLE001 - a note, best effort
        info = None
    if info is None:
        return []
    e, k, normalized = info
    out = [f"mixture of experts: {e} experts, top-{k} per token: a token runs "
           f"{experts_rule.active_fraction(e, k):.0%} of the routed expert weights; {len(stacked)} stacked "
           "parameter(s) planned per expert slice by the width rule; the router is a readout onto the experts; "
           "the number of experts is not transferred (docs/moe.md)"]
    if not normalized:
        out.append(f"top-{k} gates are not renormalised (norm_topk_prob: false): the routed output is ~k/E = "
                   f"{experts_rule.moe_output_scale(e, k, False):.2g} of one expert's; keep the expert count "
                   "equal at proxy and target (or set norm_topk_prob: true)")
    return out


def replaced_init_notes(recipe: Recipe, plan: Plan, tolerance: float = 0.25) -> list[str]:
    """Name every parameter whose factory init the rule replaces (the proxy's factory std differs
    from the rule's by more than `tolerance`, relative), so nothing is thrown away silently."""
    if not any(p.init in ("normal", "zeros", "ones") for p in plan.params.values()):
        return []
    base_plan = plan if plan.width == plan.base_width else None
    try:
        stds = factory_stds(model_factory(recipe), recipe.widths.proxy, model_args(recipe), recipe.train.seed)
        if base_plan is None:
            base_plan = make_plan(shapes_for(recipe, recipe.widths.proxy), HParams.from_train(recipe.train),
                                  recipe.train.optimizer, plan.parametrization, recipe.factory_init)
    except Exception:  # noqa: BLE001 - a note, best effort
        return []
    out = []
    for n, p in base_plan.params.items():
        if p.init not in ("normal", "zeros", "ones") or n not in stds:
            continue
        rule = p.init_std if p.init == "normal" else None
        f = stds[n]
        if rule is None or (f == 0) != (rule == 0) or (rule > 0 and abs(f / rule - 1) > tolerance):
            if p.init == "ones" and f == 0:     # a gain the factory left at 1 (std 0): the same
                continue
            if p.init == "zeros" and f == 0:
                continue
            out.append(f"{n}: factory init std {f:.3g} at the proxy replaced by the rule's "
                       f"{'constant ' + ('1' if p.init == 'ones' else '0') if rule is None or rule == 0 else format(rule, '.3g')}")
    if out:
        head = (f"the rule replaces the factory's init of {len(out)} parameter(s) "
                "(keep it with `factory_init: true` or a list of globs): ")
        return [head + "; ".join(out[:8]) + (f"; ... {len(out) - 8} more" if len(out) > 8 else "")]
    return []


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3g}"


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}E{unit}"


def _shape(base: tuple, shape: tuple) -> str:
    f = lambda t: "×".join(map(str, t)) or "scalar"  # noqa: E731
    return f(base) if base == shape else f"{f(base)}→{f(shape)}"


def lr_axes(p, hz: dict) -> str:
    """The factor each axis contributes to one parameter's LR: width (the spectral ratio, relative to the
    proxy: 1 at the proxy), depth, horizon, batch."""
    parts = []
    if p.depth_lr is not None:
        parts.append(f"d{p.depth_lr:.3g}")
    parts.append(f"h{hz['horizon_lr']:.3g}")
    parts.append(f"b{hz['batch_lr']:.3g}")
    return " ".join(parts)


def render(plan: Plan, cost: Cost, unknown: list[str], console: Optional[Console] = None) -> None:
    console = console or make_console()
    t = Table(title=f"spectral plan: width {plan.base_width} → {plan.width} ({plan.optimizer})",
              box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
    wide = console.width >= 120
    if wide:
        t.add_column("parameter", overflow="fold")
        t.add_column("proxy shape→shape", overflow="fold")
    else:   # narrow terminal: the shape goes under the name, fans share a column
        t.add_column("parameter\nproxy shape→shape", no_wrap=True)
    cols = ("role", "layout", "fan_in", "fan_out", "init std") if wide else ("role\nin→out", "init\nstd")
    hz = plan.horizon if plan.horizon and plan.horizon.get("exponent_source") != "off" else None
    axes = ("LR ×axes",) if hz else ()
    for col in (*cols, "lr", *axes, "wd", "eps", "note" if wide else ""):
        t.add_column(col, justify="left" if col.startswith("role") else "right", no_wrap=True)
    footnotes: dict[str, int] = {}
    stacked = 0
    for p in plan.params.values():
        std = ({"ones": "=1", "zeros": "=0"}.get(p.init) or (_fmt(p.init_std) if p.init_std is not None
               else (f"fac×{p.init_factor:.3g}" if p.init == "factory" else "keep")))
        mark = ""
        if p.note:
            mark = f"[{footnotes.setdefault(p.note, len(footnotes) + 1)}]"
        shape = _shape(tuple(p.base_shape), tuple(p.shape))
        head = [literal(p.name), shape] if wide else [f"{literal(p.name)}\n[dim]{shape}[/]"]
        stack = stack_shape(tuple(p.shape), p.layout)
        if stack:
            stacked += 1
        lay = (f"{p.layout}{' ×' + '×'.join(map(str, stack)) if stack else ''} [dim]{p.source}[/]") + (f" [cyan]{p.optimizer}[/]" if p.optimizer else "")
        fan = ([p.role, lay, str(p.fan_in), str(p.fan_out)] if wide
               else [f"{p.role} [dim]{p.source}[/]" + (f" [cyan]{p.optimizer}[/]" if p.optimizer else "")
                     + f"\n[dim]{p.fan_in}→{p.fan_out}{' per ×' + '×'.join(map(str, stack)) if stack else ''}[/]"])
        extra = (lr_axes(p, hz),) if hz else ()
        t.add_row(*head, *fan, std, _fmt(p.lr), *extra, _fmt(p.weight_decay), _fmt(p.eps), mark)
    console.print(t)
    if stacked:
        console.print(f"[cyan]stacked[/]: {stacked} parameter(s) are stacks of matrices (×slices): fans, init std, "
                      "LR and eps are those of one slice, the matrix the forward pass uses", highlight=False)
    for note, i in footnotes.items():
        console.print(f"\\[{i}] {literal(note)}", highlight=False)
    for m, v in plan.readout_multipliers.items():
        console.print(f"[cyan]tied readout[/] {literal(m)}: input multiplied by {v:.4g} in the forward pass")
    if plan.branch_multipliers:
        m0 = next(iter(plan.branch_multipliers.values()))[0]
        inb = [p for p in plan.params.values() if p.depth_lr is not None]
        console.print(f"[cyan]depth rule[/]: {len(plan.branch_multipliers)} residual branches, output x {m0:.4g}; "
                      f"{len(inb)} in-block parameters, LR x {inb[0].depth_lr:.4g}" if inb else "")
    for n in plan.notes:
        console.print(f"[yellow]note[/] {literal(n)}", highlight=False)
    if unknown:
        guessed = ", ".join(f"{n} as {plan.params[n].role}" if n in plan.params else n for n in unknown)
        console.print(f"[yellow]warning[/] parameters of no known module, not traced, classified by rank: {literal(guessed)}"
                      " (declare them under `layouts:` if wrong)")
    flops = (human(cost.flops_per_step, "FLOP") if cost.flops_per_step is not None
             else f"n/a FLOP (the model did not run on a meta batch: {literal(cost.flops_error)})")
    if cost.flops_note:
        console.print(f"[dim]FLOPs: {cost.flops_note}[/]", highlight=False)
    console.print(
        f"[bold]target[/]: {cost.params:,} parameters ({human(cost.params)}), "
        f"~{flops} per training step, "
        f"{cost.memory_bytes / 2**30:.3g} GiB for fp32 weights + grads + optimizer state"
    )


def write_json(plan: Plan, cost: Cost, path: str | Path) -> None:
    d = {"written_by": marker("plan"), **plan.to_json()}
    d["cost"] = {"params": cost.params, "flops_per_step": cost.flops_per_step, "memory_bytes": cost.memory_bytes,
                 "flops_error": cost.flops_error, "flops_note": cost.flops_note}
    atomic.write_json(path, d)
