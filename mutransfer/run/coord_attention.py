"""Attention logits seen inside any model, for the coordinate check, without hook points.

During a probe pass a TorchFunctionMode watches:
  - F.scaled_dot_product_attention(q, k, v, scale=...): the logits q k^T * scale are computed from
    its arguments (scale defaults to 1/sqrt(q.shape[-1]), as torch's);
  - eager attention: a matmul of two activations (q @ k^T: contracted size d_head), optionally
    multiplied or divided by a number, masked (add / masked_fill / where), then softmax-ed: the
    softmax's input (masked entries dropped) is the logits, and the number is the scale;
  - F.multi_head_attention_forward (nn.MultiheadAttention): its 1/sqrt(embed_dim / num_heads).
Each attention site is named by the innermost module running when it happens (the Probe keeps the
stack). For every site we keep (d_head, scale) per width: the structural check `scale_finding`
says when d_head grows with width and the scale goes like 1/sqrt(d_head) (muP needs 1/d_head),
with no training needed.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SUFFIX = ":attn-logits"
_MASKED = -1e4          # entries at or below this are masks (finfo.min, -inf), not logits


def _number(x) -> Optional[float]:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if torch.is_tensor(x) and x.dim() == 0 and x.is_floating_point() and x.device.type != "meta":
        return float(x)
    return None


class AttentionTracer(TorchFunctionMode):
    """Collects, per site, the logits tensors of one forward pass and their (d_head, scale)."""

    def __init__(self, where: Callable[[], str]):
        super().__init__()
        self.where = where
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.static: dict[str, tuple[int, float]] = {}
        self._scores: dict[int, tuple] = {}     # id(tensor) -> (tensor, d_head, scale) for eager scores

    def _site(self, logits: torch.Tensor, d_head: int, scale: Optional[float]) -> None:
        name = (self.where() or "<model>") + SUFFIX
        self.logits.setdefault(name, []).append(logits.detach())
        if scale is not None:
            self.static.setdefault(name, (int(d_head), float(scale)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except Exception:   # noqa: BLE001 - measuring must never break the forward pass
            pass
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", "")
        if func is F.scaled_dot_product_attention or name == "scaled_dot_product_attention":
            q, k = args[0], args[1]
            scale = kwargs.get("scale")
            if scale is None and len(args) > 6:
                scale = args[6]
            d = q.shape[-1]
            s = float(scale) if scale is not None else 1.0 / math.sqrt(d)
            if k.shape[-3] != q.shape[-3] and q.dim() == 4 and q.shape[-3] % k.shape[-3] == 0:   # GQA
                k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            self._site((q.float() @ k.float().transpose(-2, -1)) * s, d, s)
            return
        if name == "multi_head_attention_forward":
            e, h = args[0].shape[-1], args[4] if len(args) > 4 else kwargs.get("num_heads")
            if isinstance(h, int) and h > 0:
                self.static.setdefault((self.where() or "<model>") + SUFFIX, (e // h, 1.0 / math.sqrt(e // h)))
            return
        if not torch.is_tensor(out):
            return
        if name in ("matmul", "__matmul__") and len(args) >= 2 and all(torch.is_tensor(a) for a in args[:2]):
            a, b = args[0], args[1]
            if a.dim() >= 3 and b.dim() >= 3 and not isinstance(a, torch.nn.Parameter) \
                    and not isinstance(b, torch.nn.Parameter) and a.shape[-1] == b.shape[-2]:
                self._scores[id(out)] = (out, a.shape[-1], 1.0)
            return
        tracked = None
        for a in args:
            hit = self._scores.get(id(a)) if torch.is_tensor(a) else None
            if hit is not None and hit[0] is a:
                tracked = (a, hit)
                break
        if tracked is None:
            return
        a, (_, d, s) = tracked
        others = [x for x in args if x is not a]
        if name in ("mul", "__mul__", "__rmul__", "__imul__", "mul_"):
            n = next((v for v in map(_number, others) if v is not None), None)
            if n is not None:
                self._scores[id(out)] = (out, d, s * n)
        elif name in ("div", "__truediv__", "__itruediv__", "div_"):
            n = _number(args[1]) if len(args) > 1 and args[0] is a else None
            if n:
                self._scores[id(out)] = (out, d, s / n)
        elif name in ("add", "__add__", "__radd__", "__iadd__", "add_", "masked_fill", "masked_fill_", "where",
                      "to", "float", "type", "contiguous", "__getitem__"):
            self._scores[id(out)] = (out, d, s)
        elif name in ("softmax", "_softmax", "log_softmax"):
            x = args[0].detach()
            self._site(torch.where(x > _MASKED, x, torch.zeros((), dtype=x.dtype, device=x.device)), d, s)

    def clear_scores(self) -> None:
        self._scores.clear()


def scale_finding(name: str, per_width: dict[int, tuple[int, float]]) -> Optional[str]:
    """A structural finding for one attention site from its (d_head, scale) at each width, or None.

    d_head growing with width and scale * sqrt(d_head) constant (1/sqrt(d_head)) is the porting bug:
    under muP q and k become correlated, so q.k grows like d_head and the logits like sqrt(d_head)."""
    ws = sorted(per_width)
    if len(ws) < 2:
        return None
    (d0, s0), (d1, s1) = per_width[ws[0]], per_width[ws[-1]]
    if d1 <= d0 or s0 <= 0 or s1 <= 0:
        return None
    p = math.log(s1 / s0) / math.log(d1 / d0)     # scale ~ d_head^p
    if p > -0.75:
        site = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
        return (f"{site}: scale 1/√d_head with d_head ∝ width (d_head {d0}→{d1}, scale ~ d_head^{p:+.2f}); "
                "μP needs 1/d_head")
    return None
