"""Width inference: build a model at two widths on the meta device, match parameters by name, and
decide for each its layout, fans and role. Nothing here allocates real memory.

Roles (by which fans grow with width):
  hidden  both fans grow          input   only fan_out grows (embeddings: fan_in is 1, one-hot)
  output  only fan_in grows       vector  a bias or norm gain (fan_in 1) whose size grows
  fixed   nothing grows
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import UserError
from .branches import Branches, find_branches
from .trace import Use, layout_from_use, trace_uses

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)


@dataclass(frozen=True)
class ParamShape:
    name: str
    shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    kind: str        # weight | embedding | bias | gain | raw
    layout: str      # out_in | in_out | embedding | vector | fixed | stacked out_in | stacked in_out | stacked vector
    role: str        # input | hidden | output | vector | fixed
    fan_in: int
    fan_out: int
    base_fan_in: int
    base_fan_out: int
    module: str      # owning module's class name ("" for none)
    source: str = "module"   # how the layout was decided: module | traced | declared | guessed
    use_layout: Optional[str] = None   # the module's or traced layout when `layouts:` overrode it


@dataclass
class Shapes:
    width: int
    base_width: int
    params: dict[str, ParamShape]
    # readout module name -> name of the embedding parameter it shares (tied embedding / readout)
    tied_readouts: dict[str, str] = field(default_factory=dict)
    # parameters of no known module whose use could not be traced, classified by rank (in a warning)
    unknown: list[str] = field(default_factory=list)
    # why the trace did not run or failed ("" when it ran or was not needed)
    trace_note: str = ""
    # residual branches (depth transfer only; branches.py)
    branches: Optional[Branches] = None


def build_meta(factory: Callable, width: int, args: dict[str, Any], where: str = "model") -> nn.Module:
    """Call factory(width=width, **args) on the meta device; user-caused failures become UserError."""
    try:
        with torch.device("meta"):
            model = factory(width=width, **args)
    except UserError:
        raise
    except TypeError as e:
        raise UserError(f"{where}.args", f"factory call failed at width {width}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        raise UserError(f"{where}", f"factory failed at width {width}: {type(e).__name__}: {e}") from None
    except SystemExit as e:
        raise UserError(f"{where}.factory", f"the factory called sys.exit({e.code!r}) at width {width}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{where}.factory", f"factory returned {type(model).__name__}, not a torch.nn.Module")
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise UserError(f"{where}.factory", f"lazy parameters ({', '.join(lazy[:3])}; e.g. nn.LazyLinear) have no "
                        "shape until the first forward pass: give the layers their sizes")
    return model


def _owners(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """Full parameter name (every alias) -> (module name, module, attribute name)."""
    out = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, _ in mod.named_parameters(recurse=False):
            out[f"{mname}.{pname}" if mname else pname] = (mname, mod, pname)
    return out


def _module_layout(mod: nn.Module, attr: str, ndim: int) -> tuple[str, str]:
    """(kind, layout) from the owning module; ("raw", guess) when the module is unknown."""
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and attr == "weight":
        return "embedding", "embedding"
    if isinstance(mod, (nn.Linear, nn.Bilinear)) and attr == "weight" and ndim == 2:
        return "weight", "out_in"
    if isinstance(mod, nn.modules.conv._ConvNd) and attr == "weight":
        return "weight", ("in_out" if mod.transposed else "out_in")
    if isinstance(mod, nn.MultiheadAttention) and attr.endswith("proj_weight"):
        return "weight", "out_in"
    if isinstance(mod, _NORMS):
        return ("gain" if attr == "weight" else "bias"), "vector"
    if attr == "bias" or attr.endswith("_bias"):
        if isinstance(mod, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.MultiheadAttention)):
            return "bias", "vector"
    # unknown: guess by rank
    if ndim == 0:
        return "raw", "fixed"
    if ndim == 1:
        return "raw", "vector"
    return "raw", "out_in"


STACKED = ("stacked out_in", "stacked in_out", "stacked vector")


def stack_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The leading (stacked) dimensions of a stacked layout: () for any other layout."""
    if layout in ("stacked out_in", "stacked in_out"):
        return tuple(shape[:-2])
    if layout == "stacked vector":
        return tuple(shape[:-1])
    return ()


def _experts_module_layout(mod: nn.Module, attr: str, shape: tuple[int, ...]) -> Optional[tuple[str, str]]:
    """Fast path for a known stack of experts: transformers' experts modules (decorated with
    `use_experts_implementation`: they carry `num_experts` and `is_transposed`) store each expert's
    matrix in one 3-D tensor (E, out, in), or (E, in, out) when is_transposed, and its bias (E, out)."""
    n = getattr(mod, "num_experts", None)
    tr = getattr(mod, "is_transposed", None)
    if not isinstance(n, int) or not isinstance(tr, bool) or not shape or shape[0] != n:
        return None
    if len(shape) == 3:
        return "weight", ("stacked in_out" if tr else "stacked out_in")
    if len(shape) == 2 and "bias" in attr:
        return "bias", "stacked vector"
    return None


def fans(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """(fan_in, fan_out) of a parameter of `shape` stored in `layout`; for a stack of matrices
    (`stacked ...`: every leading dimension indexes one slice), the fans of one slice, the matrix the
    forward pass uses it as."""
    if layout.startswith("stacked "):
        inner = layout.split(" ", 1)[1]
        k = len(stack_shape(shape, layout))
        if len(shape) <= k or (inner != "vector" and len(shape) < 3):
            raise ValueError(f"layout {layout!r} needs a stack dimension and a matrix (vector); shape {shape}")
        return fans(tuple(shape[k:]), inner)
    if layout == "fixed" or len(shape) == 0:
        return 1, 1
    if layout == "vector":
        return 1, max(1, math.prod(shape))
    if layout == "embedding":
        return 1, shape[-1]
    if len(shape) == 1:
        return 1, shape[0]
    if layout == "out_in":   # (out, in, *kernel): nn.Linear, nn.Conv*
        return math.prod(shape[1:]), shape[0]
    if layout == "in_out":   # (in, out, *kernel): x @ W, nn.ConvTranspose*
        return shape[0] * math.prod(shape[2:]), shape[1]
    raise ValueError(f"unknown layout {layout!r}")


def _role(kind: str, layout: str, fi: tuple[int, int], fo: tuple[int, int]) -> str:
    in_grows, out_grows = fi[0] != fi[1], fo[0] != fo[1]
    if kind in ("bias", "gain") or layout in ("vector", "stacked vector"):
        return "vector" if out_grows else "fixed"
    if layout == "fixed":
        return "fixed"
    if in_grows and out_grows:
        return "hidden"
    if out_grows:
        return "input"
    if in_grows:
        return "output"
    return "fixed"


def infer_shapes(
    factory: Callable,
    args: dict[str, Any],
    base_width: int,
    width: int,
    layouts: Optional[dict[str, str]] = None,
    warn: bool = True,
    example: Any = None,
    branches: bool = False,
    branch_globs: Optional[list[str]] = None,
) -> Shapes:
    """Build at base_width and width (and at 2*base_width if the two are equal, to see which dims
    grow), match parameters by name and classify each: by the owning module when it is a known torch
    module, else by how one forward pass on `example` (a model input, e.g. the first batch's inputs)
    uses the parameter (trace.py), else by rank. `layouts` (glob -> layout) overrides all of these;
    a glob matching nothing is an error, an override contradicting the module or the trace a warning."""
    layouts = layouts or {}
    base = build_meta(factory, base_width, args)
    new = base if width == base_width else build_meta(factory, width, args)
    ref_w = width if width != base_width else 2 * base_width
    ref = new if ref_w == width else build_meta(factory, ref_w, args)

    base_p = dict(base.named_parameters())
    for label, other, w in (("", new, width), ("", ref, ref_w)):
        other_p = dict(other.named_parameters())
        if set(other_p) != set(base_p):
            only_b = sorted(set(base_p) - set(other_p))[:3]
            only_o = sorted(set(other_p) - set(base_p))[:3]
            raise UserError(
                "model.factory",
                f"parameter names differ between widths {base_width} and {w} "
                f"(only at {base_width}: {only_b}; only at {w}: {only_o}); "
                "the architecture (e.g. its depth) must not depend on width",
            )
        for n, p in other_p.items():
            if p.dim() != base_p[n].dim():
                raise UserError(
                    "model.factory",
                    f"parameter {n} has rank {base_p[n].dim()} at width {base_width} but {p.dim()} at {w}",
                )
    new_p, ref_p = dict(new.named_parameters()), dict(ref.named_parameters())
    if base_p and all(tuple(p.shape) == tuple(ref_p[n].shape) for n, p in base_p.items()):
        raise UserError(
            "model.factory",
            f"no parameter changes shape between widths {base_width} and {ref_w}: "
            "the factory must build its layers with the `width` it is given",
        )

    owners = _owners(base)
    aliases: dict[int, list[str]] = {}
    for n, p in base.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)

    for pat in layouts:
        if not any(fnmatch.fnmatchcase(n, pat) for n in base_p):
            raise UserError(f"layouts.{pat}", "this pattern matches no parameter of the model "
                            f"(parameters: {', '.join(list(base_p)[:6])}{', ...' if len(base_p) > 6 else ''})")

    decided: dict[str, tuple[str, str, str]] = {}
    for name, p in base_p.items():
        mods = [owners[n] for n in aliases[id(p)]]
        known = _experts_module_layout(mods[0][1], mods[0][2], tuple(p.shape))
        if known is not None:
            decided[name] = (*known, "module")
            continue
        kind, layout = _module_layout(mods[0][1], mods[0][2], p.dim())
        decided[name] = (kind, layout, "module" if kind != "raw" else "guessed")
    uses, trace_note = {}, ""
    if any(d[2] == "guessed" for d in decided.values()) or layouts:
        uses, trace_note = _trace(factory, args, base_width, base, example)
    for name, u in uses.items():
        if name in decided and decided[name][2] == "guessed":
            got = layout_from_use(u, tuple(base_p[name].shape))
            if got is not None:
                decided[name] = (got[0], got[1], "traced")

    _stacked_siblings(decided, base_p, owners, aliases)

    params: dict[str, ParamShape] = {}
    tied: dict[str, str] = {}
    unknown: list[str] = []
    for name, p in base_p.items():
        names = aliases[id(p)]
        mods = [owners[n] for n in names]
        kind, layout, source = decided[name]
        if len(names) > 1:
            emb = [m for m in mods if isinstance(m[1], (nn.Embedding, nn.EmbeddingBag))]
            lin = [m for m in mods if isinstance(m[1], nn.Linear)]
            if emb and lin:
                kind, layout = "embedding", "embedding"
                for m in lin:
                    tied[m[0]] = name
        override = next((lay for pat, lay in layouts.items() if fnmatch.fnmatchcase(name, pat)), None)
        use_layout = layout if override is not None and source in ("module", "traced") else None
        if override is not None:
            if source in ("module", "traced") and override != layout and warn:
                traced = layout_from_use(uses[name], tuple(p.shape)) if name in uses else None
                seen = f"its {type(mods[0][1]).__name__} module" if source == "module" else "the traced forward pass"
                why = traced[2] if traced else seen
                warnings.warn(f"layouts: {name} declared {override!r} but {seen} uses it as {layout!r} ({why}); "
                              "the declaration is followed", stacklevel=2)
            layout, source = override, "declared"
            need = {"stacked out_in": 3, "stacked in_out": 3, "stacked vector": 2}.get(override, 0)
            if p.dim() < need:
                pat = next(g for g in layouts if fnmatch.fnmatchcase(name, g))
                raise UserError(f"layouts.{pat}", f"{name} has shape {tuple(p.shape)}: {override!r} needs at least "
                                f"{need} dimensions (the stacked ones, then the {'matrix' if need == 3 else 'vector'})")
            if kind == "raw" and override == "stacked vector":
                kind = "bias"
            if kind == "raw" and override == "embedding":
                kind = "embedding"
        elif source == "guessed":
            unknown.append(name)
        bs, s, rs = tuple(p.shape), tuple(new_p[name].shape), tuple(ref_p[name].shape)
        bfi, bfo = fans(bs, layout)
        nfi, nfo = fans(s, layout)
        rfi, rfo = fans(rs, layout)
        role = _role(kind, layout, (bfi, rfi), (bfo, rfo))
        params[name] = ParamShape(name, s, bs, kind, layout, role, nfi, nfo, bfi, bfo, type(mods[0][1]).__name__,
                                  source, use_layout)

    if unknown and warn:
        warnings.warn(
            "parameters of no known module whose use was not traced"
            + (f" ({trace_note})" if trace_note else "")
            + ", classified by rank (declare their layout under `layouts:` if this is wrong): "
            + ", ".join(f"{n} -> {params[n].role} ({params[n].layout})" for n in unknown),
            stacklevel=2,
        )
    found = _branches(factory, args, base_width, base, example, branch_globs or []) if branches else None
    return Shapes(width, base_width, params, tied, unknown, trace_note, found)


def _stacked_siblings(decided: dict, base_p: dict, owners: dict, aliases: dict) -> None:
    """Known pattern: a module holding a stack of matrices (experts) whose rank-(k+1) parameter named
    like a bias, with the same k leading dims, was gathered by expert ids (w[ids], read as a table
    lookup) or guessed: it is a stack of biases, one per slice (gpt-oss's gate_up_proj_bias)."""
    stacks: dict[str, tuple[int, ...]] = {}
    for name, (kind, layout, source) in decided.items():
        if layout in ("stacked out_in", "stacked in_out"):
            mname = owners[aliases[id(base_p[name])][0]][0]
            stacks.setdefault(mname, tuple(base_p[name].shape[:-2]))
    if not stacks:
        return
    for name, (kind, layout, source) in list(decided.items()):
        if source not in ("traced", "guessed") or layout.startswith("stacked"):
            continue
        mname, _, attr = owners[aliases[id(base_p[name])][0]]
        lead = stacks.get(mname)
        shape = tuple(base_p[name].shape)
        if lead and "bias" in attr and len(shape) == len(lead) + 1 and shape[:len(lead)] == lead:
            decided[name] = ("bias", "stacked vector", "traced")


def _branches(factory: Callable, args: dict[str, Any], base_width: int, meta_model: nn.Module, example: Any,
              globs: list[str]) -> Branches:
    """Residual branches: declared by `residual_branches:` globs, else found by tracing."""
    if globs:
        names = [n for n, _ in meta_model.named_modules() if n]
        out = Branches()
        for g in globs:
            hit = [n for n in names if fnmatch.fnmatchcase(n, g)]
            if not hit:
                raise UserError(f"residual_branches: {g}", "this pattern matches no module of the model")
            for n in hit:
                out.modules[n] = 0
                out.blocks[n] = n.rsplit(".", 1)[0] if "." in n else ""
        return out
    if example is None:
        raise UserError("depths", "no example input to find the residual branches with")
    try:
        found = find_branches(meta_model, _to_device(example, "meta"))
    except Exception:  # noqa: BLE001 - data-dependent forward passes fail on meta; try for real
        try:
            with torch.device("cpu"):
                real = factory(width=base_width, **args)
            real.eval()
            found = find_branches(real, _to_device(example, "cpu"))
        except Exception as e:  # noqa: BLE001
            raise UserError("depths", f"the forward pass could not be traced to find residual branches "
                            f"({type(e).__name__}: {str(e)[:120]}); name them under residual_branches:") from None
    if not found.modules:
        raise UserError("depths", "no residual branch (x + f(x)) found in the model's forward pass: the depth "
                        "rule needs residual blocks; name them under residual_branches: if tracing missed them")
    return found


def _to_device(x: Any, device) -> Any:
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _trace(factory: Callable, args: dict[str, Any], base_width: int, meta_model: nn.Module,
           example: Any) -> tuple[dict[str, Use], str]:
    """Uses per parameter from one forward pass at the base width: on the meta device, else (a model
    whose forward needs real values) on the CPU. ({}, why) when there is no example or both fail."""
    if example is None:
        return {}, "no example input to trace with"
    try:
        return trace_uses(meta_model, _to_device(example, "meta")), ""
    except Exception:  # noqa: BLE001 - data-dependent forward passes fail on meta; try for real
        pass
    try:
        with torch.device("cpu"):
            real = factory(width=base_width, **args)
        real.eval()
        return trace_uses(real, _to_device(example, "cpu")), ""
    except Exception as e:  # noqa: BLE001
        return {}, f"the forward pass could not be traced: {type(e).__name__}: {str(e)[:120]}"

