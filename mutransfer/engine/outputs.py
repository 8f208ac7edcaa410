"""Which tensor of a model's return value is the prediction (recipe key `model.output`).

    None     a bare tensor is used as is; a dict / Hugging Face ModelOutput yields its `logits`
    int      index into a tuple or list: nanoGPT's `(logits, loss)` -> 0
    str      a key (dicts, ModelOutput) or an attribute
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

Spec = Optional[Union[int, str]]


class OutputError(ValueError):
    """The model's return value does not yield a tensor by the spec (message for model.output)."""


def _kind(out: Any) -> str:
    if torch.is_tensor(out):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out.keys())[:6]}"
    return f"a {type(out).__name__}"


def select(out: Any, spec: Spec = None) -> torch.Tensor:
    """The prediction tensor of `out`; OutputError saying what was returned when there is none."""
    if spec is None:
        if torch.is_tensor(out):
            return out
        if isinstance(out, Mapping) and torch.is_tensor(out.get("logits")):
            return out["logits"]
        if torch.is_tensor(getattr(out, "logits", None)):
            return out.logits
        raise OutputError(f"the model returned {_kind(out)}; set model.output to the index or key of "
                          "its prediction (e.g. 0 for (logits, loss), 'logits')")
    got = None
    if isinstance(spec, int) and not isinstance(spec, bool):
        if isinstance(out, (tuple, list)) and -len(out) <= spec < len(out):
            got = out[spec]
    elif isinstance(spec, str):
        if isinstance(out, Mapping) and spec in out:
            got = out[spec]
        elif not isinstance(out, Mapping) or hasattr(type(out), spec):
            got = getattr(out, spec, None)
    if not torch.is_tensor(got):
        raise OutputError(f"{spec!r} does not select a tensor: the model returned {_kind(out)}")
    return got


def check_against_targets(pred: torch.Tensor, y: torch.Tensor, loss: str) -> Optional[str]:
    """Why `pred` cannot be scored against targets `y` by `loss`, or None."""
    if loss == "cross_entropy":
        if pred.dim() < 1 or tuple(pred.shape[:-1]) != tuple(y.shape):
            return (f"prediction of shape {tuple(pred.shape)} that does not match targets of shape {tuple(y.shape)} "
                    "(cross_entropy wants prediction shape = target shape + (classes,))")
        if not pred.is_floating_point():
            return f"prediction has dtype {pred.dtype}, not a floating type"
    elif pred.numel() != y.numel():
        return f"prediction of shape {tuple(pred.shape)} that does not match targets of shape {tuple(y.shape)}"
    return None
