"""Layout from use: run one forward pass under a TorchFunctionMode and record, for every parameter,
how the computation uses it. The spectral rule needs each weight's fan_in (the dimensions a forward
pass contracts) and fan_out (the rest), and the module's class does not say which is which for a
parameter of no known module (Hugging Face's Conv1D computes x @ W with W stored (in, out); a ViT's
cls token is concatenated, its position table added; a raw gain multiplies).

Uses recorded (per parameter, by the dimensions of the *stored* tensor):
    contract   a matmul / linear / conv contracts these stored dimensions (fan_in = their product)
    table      indexed by integer ids (F.embedding, W[ids]) or added / concatenated onto activations
               without contraction (position tables, cls / register tokens): one-hot input, fan_in 1
    gain       multiplies activations elementwise, or is a norm's weight
    bias       a 1-D tensor added to activations, or a norm's / linear's bias
    stack      stored dimensions the forward pass indexes away (w[e], w[expert_ids]) or batches over
               (torch.bmm, torch._grouped_mm / F.grouped_mm, einsum with a letter shared by the
               activations and the output) before a contraction: the parameter is a stack of
               matrices (MoE experts, fused heads, scanned layers), each slice with its own fans
    other      anything else (the parameter is then classified by rank)

Views of a parameter (t, transpose, permute, view, reshape, expand, unsqueeze, dtype casts, slices)
are followed, with the map from their dimensions back to the stored ones, so `x @ self.w.t()` and
`torch.addmm(b, x, W)` are read correctly. The trace runs on the meta device when the model allows
it (nothing allocated), else on the CPU at the small width it was asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# functions that return a rearrangement of their first argument (dims followed below)
_SAME = {"contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "double", "type", "type_as",
         "requires_grad_", "cpu", "cuda", "__get__:data", "__get__:real", "detach_", "_to_copy"}
_SCALE = {"mul", "__mul__", "__rmul__", "div", "__truediv__", "neg", "__neg__"}   # by a Python number
_ADD = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "addcmul",
        "cat", "concat", "concatenate", "stack", "hstack", "vstack", "where"}
_MUL = {"mul", "__mul__", "__rmul__", "__imul__", "mul_", "div", "__truediv__", "__rtruediv__"}
_NORMS = {"layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm"}


@dataclass
class Use:
    """What the traced forward pass did with one parameter."""
    contract: list[tuple[int, ...]] = field(default_factory=list)   # stored dims contracted, per use
    transposed_conv: bool = False
    table: int = 0
    gain: int = 0
    bias: int = 0
    stack: set[int] = field(default_factory=set)     # stored dims indexed / batched over (stacks)
    other: list[str] = field(default_factory=list)

    def kinds(self) -> set[str]:
        k = set()
        if self.contract:
            k.add("contract")
        if self.table:
            k.add("table")
        if self.gain:
            k.add("gain")
        if self.bias:
            k.add("bias")
        return k


class _Origin:
    """A tensor derived from a parameter: its name and, per dimension, the stored dimension(s) it
    comes from (a tuple; empty for a broadcast / new dimension), and the stored dimensions indexed
    away or gathered on the way (`stack`: w[e] is one slice of a stack, w[ids] a batch of slices)."""
    __slots__ = ("name", "dims", "ref", "stack")

    def __init__(self, name: str, dims: tuple[tuple[int, ...], ...], ref, stack: tuple[int, ...] = ()):
        self.name, self.dims, self.ref, self.stack = name, dims, ref, stack


def _reshape_dims(src_shape, src_dims, dst_shape) -> Optional[tuple]:
    """Map dims through a reshape by grouping equal products; None when it cannot be followed."""
    out = []
    i = j = 0
    src_shape, dst_shape = list(src_shape), list(dst_shape)
    while i < len(src_shape) or j < len(dst_shape):
        if j < len(dst_shape) and dst_shape[j] == 1 and (i >= len(src_shape) or src_shape[i] != 1):
            out.append(())
            j += 1
            continue
        if i < len(src_shape) and src_shape[i] == 1 and (j >= len(dst_shape) or dst_shape[j] != 1):
            i += 1
            continue
        if i >= len(src_shape) or j >= len(dst_shape):
            return None
        gi, gj = [i], [j]
        pi, pj = src_shape[i], dst_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= len(src_shape):
                    return None
                gi.append(i)
                pi *= src_shape[i]
            else:
                j += 1
                if j >= len(dst_shape):
                    return None
                gj.append(j)
                pj *= dst_shape[j]
        merged = tuple(d for k in gi for d in src_dims[k])
        out.extend([merged] * len(gj))
        i += 1
        j += 1
    return tuple(out) if len(out) == len(dst_shape) else None


def _name(func) -> str:
    n = getattr(func, "__name__", "")
    if n == "__get__":
        owner = getattr(func, "__self__", None)
        return "__get__:" + getattr(owner, "__name__", "")
    return n


class UseTracer(TorchFunctionMode):
    """Records Use for every parameter of `model` during the forward passes run under it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = {}
        for n, p in model.named_parameters():
            self.params[id(p)] = (n, p)
        self.origins: dict[int, _Origin] = {}
        self.uses: dict[str, Use] = {}
        self.keep: list = []        # derived tensors stay alive, so their ids are not reused

    # -- origins -------------------------------------------------------------------------------
    def origin(self, t) -> Optional[_Origin]:
        if not torch.is_tensor(t):
            return None
        hit = self.params.get(id(t))
        if hit is not None and hit[1] is t:
            return _Origin(hit[0], tuple((d,) for d in range(t.dim())), t)
        o = self.origins.get(id(t))
        return o if o is not None and o.ref is t else None

    def _derive(self, out, o: _Origin, dims, stack: tuple[int, ...] = ()) -> None:
        if torch.is_tensor(out) and dims is not None and len(dims) == out.dim():
            self.origins[id(out)] = _Origin(o.name, tuple(dims), out, tuple(sorted(set(o.stack) | set(stack))))
            self.keep.append(out)

    def _contract(self, o: _Origin, dims: tuple[int, ...], batch: tuple = ()) -> None:
        """o contracts stored `dims`; `batch` (per-dimension tuples) are batched over (a stack)."""
        u = self.use(o.name)
        u.contract.append(dims)
        u.stack.update(o.stack)
        for b in batch:
            u.stack.update(b)

    def use(self, name: str) -> Use:
        return self.uses.setdefault(name, Use())

    # -- the hook ------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(_name(func), args, kwargs, out)
        except Exception:   # noqa: BLE001 - tracing must never break the user's forward pass
            pass
        return out

    def _record(self, fn: str, args, kwargs, out) -> None:
        tensors = [a for a in args if torch.is_tensor(a)] + [v for v in kwargs.values() if torch.is_tensor(v)]
        flat = list(tensors)
        for a in args:
            if isinstance(a, (list, tuple)):
                flat.extend(x for x in a if torch.is_tensor(x))
        origins = [(t, self.origin(t)) for t in flat]
        origins = [(t, o) for t, o in origins if o is not None]
        if not origins:
            return
        first = args[0] if args else None
        o0 = self.origin(first)

        # ---- one slice (w[e]) or a gathered batch of slices (w[ids]) of a stack of matrices
        if o0 is not None and fn in ("__getitem__", "index_select") and torch.is_tensor(out):
            got = _stack_index(fn, first, o0, args)
            if got is not None:
                self._derive(out, o0, got[0], got[1])
                return
        # ---- rearrangements of one parameter-derived tensor
        if o0 is not None and len(origins) == 1 and torch.is_tensor(out):
            dims = self._follow(fn, first, o0, args, kwargs, out)
            if dims is not None:
                self._derive(out, o0, dims)
                return
        # ---- uses
        if fn == "linear":
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            ow, ob = self.origin(w), self.origin(b)
            if ow is not None:
                self._contract(ow, ow.dims[-1])
            if ob is not None:
                self.use(ob.name).bias += 1
                self.use(ob.name).stack.update(ob.stack)
            return
        if fn in ("grouped_mm", "_grouped_mm"):
            # (S, K) x grouped (G, K, N) -> (S, N): mat_b is a stack of G matrices used as x @ W[g]
            a, b = args[0], (args[1] if len(args) > 1 else kwargs.get("mat_b"))
            ob, oa = self.origin(b), self.origin(a)
            if ob is not None and oa is None and b.dim() == 3:
                self._contract(ob, ob.dims[-2], ob.dims[:1])
            elif oa is not None and ob is None and a.dim() == 3:
                self._contract(oa, oa.dims[-1], oa.dims[:1])
            else:
                for o in (oa, ob):
                    if o is not None:
                        self.use(o.name).other.append(fn)
            return
        if fn == "einsum":
            self._einsum(args, kwargs)
            return
        if fn in ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "addmm", "baddbmm", "addbmm", "addmv"):
            if fn in ("addmm", "baddbmm", "addbmm", "addmv"):
                add, a, b = args[0], args[1], args[2]
                oa = self.origin(add)
                if oa is not None:
                    self.use(oa.name).bias += 1
            elif fn == "__rmatmul__":
                b, a = args[0], args[1]
            else:
                a, b = args[0], args[1]
            oa, ob = self.origin(a), self.origin(b)
            # leading dims of a 3-D+ operand are batched over (bmm, batched matmul): a stack
            if ob is not None and oa is None:
                self._contract(ob, ob.dims[0] if b.dim() == 1 else ob.dims[-2], ob.dims[:-2])
            elif oa is not None and ob is None:
                self._contract(oa, oa.dims[-1], oa.dims[:-2])
            else:
                for o in (oa, ob):
                    if o is not None:
                        self.use(o.name).other.append(fn)
            return
        if fn in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
            ow = self.origin(args[1] if len(args) > 1 else kwargs.get("weight"))
            ob = self.origin(args[2] if len(args) > 2 else kwargs.get("bias"))
            if ow is not None:
                u = self.use(ow.name)
                if "transpose" in fn:
                    u.transposed_conv = True
                    u.contract.append(tuple(d for k in (0,) + tuple(range(2, len(ow.dims))) for d in ow.dims[k]))
                else:
                    u.contract.append(tuple(d for k in range(1, len(ow.dims)) for d in ow.dims[k]))
            if ob is not None:
                self.use(ob.name).bias += 1
            return
        if fn == "embedding" or fn == "embedding_bag":
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            ow = self.origin(w)
            if ow is not None:
                self.use(ow.name).table += 1
            return
        if fn in _NORMS:
            for key, kind in (("weight", "gain"), ("bias", "bias")):
                t = kwargs.get(key)
                if t is None:
                    idx = {"layer_norm": {"weight": 2, "bias": 3}, "group_norm": {"weight": 2, "bias": 3},
                           "rms_norm": {"weight": 2}, "batch_norm": {"weight": 3, "bias": 4},
                           "instance_norm": {"weight": 3, "bias": 4}}[fn].get(key)
                    t = args[idx] if idx is not None and len(args) > idx else None
                o = self.origin(t)
                if o is not None:
                    setattr(self.use(o.name), kind, getattr(self.use(o.name), kind) + 1)
            return
        if fn in ("__getitem__", "index_select", "take", "gather") and o0 is not None and not o0.stack:
            idx = args[2] if fn == "index_select" else (args[1] if len(args) > 1 else None)
            if torch.is_tensor(idx) and not idx.is_floating_point() and idx.dtype != torch.bool:
                self.use(o0.name).table += 1
                return
        activations = [t for t in flat if self.origin(t) is None and t.dim() > 0]
        if fn in _ADD and activations:
            for t, o in origins:
                u = self.use(o.name)
                if o.stack and len(o.dims) - sum(1 for x in o.dims if not x) <= 1:
                    u.bias += 1                      # a slice (or gathered slices) of a stack of biases
                    u.stack.update(o.stack)
                elif _stored_rank(self, o) <= 1:
                    u.bias += 1
                else:
                    u.table += 1
            return
        if fn in _MUL and activations:
            for _, o in origins:
                self.use(o.name).gain += 1
            return
        for _, o in origins:
            self.use(o.name).other.append(fn)

    def _einsum(self, args, kwargs) -> None:
        """einsum: a parameter operand contracts the letters absent from the output; letters it shares
        with the output *and* with an activation operand are batched over (a stack)."""
        eq = args[0]
        ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if not isinstance(eq, str) or "..." in eq:
            for t in ops:
                o = self.origin(t)
                if o is not None:
                    self.use(o.name).other.append("einsum")
            return
        lhs, _, rhs = eq.replace(" ", "").partition("->")
        terms = lhs.split(",")
        if not rhs and "->" not in eq:
            rhs = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
        for i, t in enumerate(ops):
            o = self.origin(t)
            if o is None or i >= len(terms) or len(terms[i]) != len(o.dims):
                continue
            if any(self.origin(x) is not None for j, x in enumerate(ops) if j != i):
                self.use(o.name).other.append("einsum")
                continue
            others = set("".join(terms[j] for j in range(len(terms)) if j != i))
            mine = terms[i]
            con = tuple(d for k, c in enumerate(mine) if c not in rhs for d in o.dims[k])
            batch = tuple(o.dims[k] for k, c in enumerate(mine) if c in rhs and c in others)
            if con:
                self._contract(o, con, batch)
            else:
                self.use(o.name).other.append("einsum")

    def _follow(self, fn, t, o, args, kwargs, out):
        """Dims of `out` in terms of the stored parameter, when `fn` only rearranges `t`."""
        d = o.dims
        if fn in _SAME or fn in ("__get__:data",):
            return d if out.shape == t.shape else None
        if fn in _SCALE and len(args) == 2 and isinstance(args[1], (int, float)):
            return d
        if fn in ("add", "__add__", "__radd__", "sub", "__sub__", "__rsub__") and len(args) == 2 \
                and isinstance(args[1], (int, float)):
            return d            # w + 1 (Gemma's zero-centred gain), 1 - w: still the parameter's own shape
        if fn in ("t", "__get__:T", "__get__:mT", "__get__:H", "__get__:mH", "adjoint"):
            if len(d) < 2:
                return d
            return d[:-2] + (d[-1], d[-2]) if fn in ("__get__:mT", "__get__:mH", "adjoint") or len(d) == 2 else tuple(reversed(d))
        if fn in ("transpose", "swapaxes", "swapdims"):
            a, b = (args[1], args[2]) if len(args) >= 3 else (kwargs.get("dim0"), kwargs.get("dim1"))
            lst = list(d)
            lst[a], lst[b] = lst[b], lst[a]
            return tuple(lst)
        if fn == "permute":
            order = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            return tuple(d[k] for k in order)
        if fn in ("unsqueeze",):
            k = args[1] if len(args) > 1 else kwargs.get("dim")
            k = k if k >= 0 else k + len(d) + 1
            return d[:k] + ((),) + d[k:]
        if fn in ("expand", "expand_as", "broadcast_to"):
            extra = out.dim() - len(d)
            return ((),) * extra + d
        if fn in ("view", "reshape", "flatten", "view_as", "reshape_as", "squeeze", "unflatten"):
            if fn == "squeeze" and not (len(args) > 1 or kwargs):
                return tuple(x for x, s in zip(d, t.shape) if s != 1)
            return _reshape_dims(t.shape, d, out.shape)
        if fn == "__getitem__" and out.dim() == t.dim():
            idx = args[1]
            if isinstance(idx, (slice, type(Ellipsis))) or (
                    isinstance(idx, tuple) and all(isinstance(i, (slice, type(Ellipsis))) for i in idx)):
                return d
        return None


def _is_int_index(i) -> bool:
    return (isinstance(i, int) and not isinstance(i, bool)) or (
        torch.is_tensor(i) and i.dim() == 0 and not i.is_floating_point() and i.dtype != torch.bool)


def _stack_index(fn, t, o: _Origin, args) -> Optional[tuple[tuple, tuple[int, ...]]]:
    """(dims of the result, stored dims indexed over) when `fn` takes slices of a stack: w[e] (an
    integer, or integers on leading dims) of a 2-D+ tensor, or w[ids] / index_select(w, 0, ids) with an
    integer tensor of a 3-D+ tensor (a batch of matrices, one per selected expert). An integer tensor
    indexing a 2-D table is a lookup (an embedding), not this."""
    d = o.dims
    if fn == "index_select":
        if len(args) < 3 or args[1] != 0 or t.dim() < 3:
            return None
        return ((),) + d[1:], tuple(d[0])
    idx = args[1] if len(args) > 1 else None
    lead = idx if isinstance(idx, tuple) else (idx,)
    if lead and all(_is_int_index(i) for i in lead) and len(lead) < t.dim():
        return d[len(lead):], tuple(x for k in range(len(lead)) for x in d[k])
    if (torch.is_tensor(idx) and idx.dim() >= 1 and not idx.is_floating_point() and idx.dtype != torch.bool
            and t.dim() >= 3):
        return ((),) * idx.dim() + d[1:], tuple(d[0])
    return None


def _stored_rank(tracer: UseTracer, o: _Origin) -> int:
    hit = next((p for n, p in tracer.params.values() if n == o.name), None)
    return hit.dim() if hit is not None else len(o.dims)


def trace_uses(model: nn.Module, x: Any) -> dict[str, Use]:
    """Run model(x) under the tracer (no grad) and return the uses per parameter name."""
    tracer = UseTracer(model)
    with torch.no_grad(), tracer:
        model(x)
    return tracer.uses


def layout_from_use(u: Use, shape: tuple[int, ...]) -> Optional[tuple[str, str, str]]:
    """(kind, layout, reason) from a parameter's traced uses; None when the uses do not settle it.

    Contraction wins over everything else (a tied table that is also a readout is an embedding: see
    shapes.py); a table is an embedding (fan_in 1); a gain or bias a vector."""
    nd = len(shape)
    kinds = u.kinds()
    if u.stack:
        return _stacked_layout(u, nd)
    if "table" in kinds and "contract" in kinds:
        return "embedding", "embedding", "traced: indexed and contracted (tied)"
    if "contract" in kinds:
        dims = set(u.contract)
        if len(dims) != 1:
            return None
        c = next(iter(dims))
        if u.transposed_conv and nd > 2:
            return "weight", "in_out", "traced: conv_transpose"
        if nd == 2:
            if c == (1,):
                return "weight", "out_in", "traced: W·x"
            if c == (0,):
                return "weight", "in_out", "traced: x·W"
            return None
        if nd > 2 and c == tuple(range(1, nd)):
            return "weight", "out_in", "traced: conv / W·x"
        return None
    if "table" in kinds:
        if nd <= 1:
            return "bias", "vector", "traced: added"
        return "embedding", "embedding", "traced: table (indexed or added)"
    if kinds == {"gain"} or kinds == {"gain", "bias"}:
        return "gain", "vector", "traced: elementwise scale"
    if kinds == {"bias"}:
        return "bias", "vector", "traced: bias"
    return None


def _stacked_layout(u: Use, nd: int) -> Optional[tuple[str, str, str]]:
    """A stack: the indexed / batched dims must be the leading ones, and the rest one matrix (W·x or
    x·W, the same in every use) or one vector (a bias added per slice)."""
    lead = set(range(len(u.stack)))
    if u.stack != lead:
        return None
    k = len(lead)
    if u.contract and not (u.table or u.gain or u.bias):
        dims = set(u.contract)
        if len(dims) != 1 or nd - k != 2:
            return None
        c = next(iter(dims))
        if c == (nd - 1,):
            return "weight", "stacked out_in", f"traced: stack of {k} dim(s), W[e]·x"
        if c == (nd - 2,):
            return "weight", "stacked in_out", f"traced: stack of {k} dim(s), x·W[e]"
        return None
    if not u.contract and (u.bias or u.gain) and nd - k == 1:
        return ("bias" if u.bias else "gain"), "stacked vector", f"traced: stack of {k} dim(s), per-slice vector"
    return None
