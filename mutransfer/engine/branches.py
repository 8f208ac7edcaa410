"""Residual branches found by tracing one forward pass: the modules whose output is added onto a
residual stream, so the depth rule (depth.py) can scale them without editing the model.

A module M is a residual branch when an addition `a + M(...)` (either order) takes M's output
(the outermost module that returned that tensor, or the first tensor of the tuple it returned, as
Hugging Face attention does) and a residual stream `a`: the input of the module that encloses M (a
block's input) or the result of an earlier such addition (the stream after the previous branch).
Sums of parallel branches (`f(x) + g(x)`) and of embeddings are therefore not branches. The block of a
branch is its enclosing module: every parameter under it gets the in-block rules (the block's norms
included, since their gradients too pass through the branch multiplier).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_ADDS = {"add", "__add__", "__radd__", "__iadd__", "add_"}


@dataclass
class Branches:
    modules: dict[str, int] = field(default_factory=dict)   # branch module -> index of the tensor in its output
    blocks: dict[str, str] = field(default_factory=dict)    # branch module -> its enclosing block module

    def block_params(self, names) -> dict[str, str]:
        """Parameter name -> the branch whose block holds it (parameters outside blocks are absent)."""
        out = {}
        for b, blk in self.blocks.items():
            pre = f"{blk}." if blk else ""
            for n in names:
                if n.startswith(pre) and n not in out:
                    out[n] = b
        return out


def _tensors(x: Any) -> list:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for t in x if torch.is_tensor(t)]
    if isinstance(x, dict):
        return [t for t in x.values() if torch.is_tensor(t)]
    return []


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.root = model
        self.stack: list[str] = []
        self.outputs: dict[int, tuple[str, int, Any]] = {}    # id(tensor) -> (module, index, tensor)
        self.inputs: dict[str, list] = {}                      # module -> its input tensors (last call)
        self.streams: dict[int, Any] = {}                      # residual additions' results
        self.found: dict[str, tuple[int, str]] = {}
        self.keep: list = []

    def pre(self, module, args, kwargs):
        n = self.names.get(id(module))
        if n is not None:
            self.stack.append(n)
            ts = _tensors(args) + _tensors(kwargs)
            self.inputs[n] = ts
            self.keep.extend(ts)

    def post(self, module, args, kwargs, out):
        n = self.names.get(id(module))
        if n is None:
            return
        if self.stack and self.stack[-1] == n:
            self.stack.pop()
        if module is self.root:
            return
        for i, t in enumerate(_tensors(out)[:1]):
            self.outputs[id(t)] = (n, i, t)      # outer modules overwrite inner ones: outermost wins
            self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") in _ADDS and len(args) >= 2 and torch.is_tensor(args[0]) \
                and torch.is_tensor(args[1]) and args[0].shape == args[1].shape:
            for a, b in ((args[0], args[1]), (args[1], args[0])):
                hit = self.outputs.get(id(b))
                if hit is None or hit[2] is not b:
                    continue
                mod = hit[0]
                parent = self.stack[-1] if self.stack else ""
                stream = any(a is t for t in self.inputs.get(parent, ())) or self.streams.get(id(a)) is a
                if stream and mod != parent and (not parent or mod.startswith(parent + ".")):
                    self.found.setdefault(mod, (hit[1], parent))
                    self.streams[id(out)] = out
                    self.keep.append(out)
                    break
        return out


def find_branches(model: nn.Module, x: Any) -> Branches:
    """Trace model(x) and return its residual branches."""
    tr = _Tracer(model)
    hooks = []
    for _, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(tr.pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(tr.post, with_kwargs=True))
    try:
        with torch.no_grad(), tr:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return Branches({m: i for m, (i, _) in tr.found.items()}, {m: p for m, (_, p) in tr.found.items()})


class BranchScale:
    """Forward hook: multiply a branch's output (the tensor at `index` of a tuple) by m."""

    def __init__(self, m: float, index: int = 0):
        self.m, self.index = float(m), index

    def __call__(self, module, args, out):
        if torch.is_tensor(out):
            return out * self.m
        if isinstance(out, tuple) and len(out) > self.index and torch.is_tensor(out[self.index]):
            return out[:self.index] + (out[self.index] * self.m,) + out[self.index + 1:]
        if isinstance(out, list) and len(out) > self.index and torch.is_tensor(out[self.index]):
            out = list(out)
            out[self.index] = out[self.index] * self.m
            return out
        return out
