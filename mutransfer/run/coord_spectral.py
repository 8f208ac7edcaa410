"""The spectral condition itself, measured (Yang, Simon & Bernstein, 003_35bb903ebc618867.txt):
for every matrix W (fan_out x fan_in, as the forward pass uses it: the traced layout), ||W||_2 at
init and ||dW||_2 after the check's steps should both go like sqrt(fan_out / fan_in). We record
each norm divided by what it should be per width (init_target, target); its log-log slope should be ~0. Activations can hide a
mis-scaled parameter (a position table 4x too small is washed out by the token embedding), its
norm cannot.

fan_in-1 tables (embeddings, position tables, cls tokens) are judged on their mean row norm (the
image of one one-hot input), since ||W||_2 of a vocab x width table carries sqrt(vocab). A
zero-initialised matrix is judged on ||dW||_2 only. Spectral norms come from a few power
iterations from a fixed start: a slope needs consistency across widths, not the third digit.

The update is judged in feature space (docs/verdicts.md): what dW does to the layer's actual inputs
on the probe batch, rms(dW x) / rms(x) (= ||dW x||_2 / ||x||_2 / sqrt(fan_out/fan_in) per input vector,
so the same normalisation as the operator norm). ||dW||_2 is the right size only for a rank-one update
aligned with the data; Adam's update of a convolution (summed over many positions) is high-rank, its
operator norm grows like a random matrix's while the features it moves stay Theta(1). What dW x
measures is Desideratum 1 itself (the change of the layer's output caused by its own update).
Measured for nn.Linear, nn.Conv1d/2d/3d, nn.Embedding (the rows the probe uses) and any module whose
2-D weight meets its input's last dimension; other matrices fall back to ||dW||_2. ||W_0|| is kept as
the operator norm (a random init is high-rank by design: its operator norm is the right size).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.shapes import fans
from ..engine.spectral import init_std

ITERS = 12
OPERATOR = "‖ΔW‖"         # the update's operator norm (fallback)
FEATURE = "‖ΔW·x‖"        # the update applied to the layer's inputs on the probe batch


def as_matrix(p: torch.Tensor, layout: str) -> Optional[torch.Tensor]:
    """W as a (fan_out x fan_in) matrix (rows = one-hot images for tables); None for vectors. A stack
    of matrices gives its first slice (every slice follows the same rule)."""
    if p.dim() < 2 or layout in ("vector", "fixed", "stacked vector"):
        return None
    if layout.startswith("stacked "):
        return as_matrix(p.reshape(-1, *p.shape[-2:])[0], layout.split(" ", 1)[1])
    if layout == "embedding":
        return p.reshape(-1, p.shape[-1])
    if layout == "in_out":
        return p.transpose(0, 1).reshape(p.shape[1], -1)
    return p.reshape(p.shape[0], -1)


def spectral_norm(m: torch.Tensor, iters: int = ITERS) -> float:
    m = m.detach().float()
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(m.shape[1], generator=g).to(m.device)
    v = v / v.norm()
    s = 0.0
    for _ in range(iters):
        u = m @ v
        nu = u.norm()
        if nu == 0:
            return 0.0
        v = m.t() @ (u / nu)
        s = float(v.norm())
        if s == 0:
            return 0.0
        v = v / s
    return s


def size(p: torch.Tensor, layout: str) -> Optional[float]:
    """The norm the spectral condition is about: ||W||_2, or the mean row norm for a table."""
    m = as_matrix(p, layout)
    if m is None:
        return None
    if layout == "embedding":
        return float(m.detach().float().norm(dim=1).mean())
    return spectral_norm(m)


def target(fan_in: int, fan_out: int, layout: str) -> float:
    """What the condition prescribes up to a constant: sqrt(fan_out / fan_in) (tables: fan_in 1)."""
    return math.sqrt(fan_out / (1 if layout == "embedding" else fan_in))


def init_target(fan_in: int, fan_out: int, layout: str) -> float:
    """||W_0||_2 of a Gaussian matrix with the rule's sigma = min(1, sqrt(fan_out/fan_in)) / sqrt(fan_in):
    sigma (sqrt(fan_in) + sqrt(fan_out)), i.e. the condition's sqrt(fan_out/fan_in) times the finite-size
    factor 1 + sqrt(min/max fan ratio), which bends where the fans cross (a stem with fan_in 27 at 16 -> 32
    channels, a gate with 12 inputs and width/16 outputs); dividing by it leaves no slope in any regime.
    Tables (mean row norm): sqrt(fan_out)."""
    if layout == "embedding":
        return math.sqrt(fan_out)
    return init_std(fan_in, fan_out) * (math.sqrt(fan_in) + math.sqrt(fan_out))


def _rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


def feature_ratio(module: nn.Module, attr: str, dw: torch.Tensor, x, layout: str) -> Optional[float]:
    """rms(dW x) / rms(x) for the update `dw` of `module.<attr>` on its input `x`, or None when the
    way the module applies it is not known (the caller then falls back to the operator norm)."""
    if not torch.is_tensor(x) or x.numel() == 0:
        return None
    if isinstance(module, nn.Embedding) and attr == "weight" and not x.is_floating_point():
        return _rms(dw[x.reshape(-1).clamp(0, dw.shape[0] - 1)])      # the rows the probe's tokens pick
    if not x.is_floating_point() or dw.dim() < 2:
        return None
    rx = _rms(x)
    if not rx > 0:
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and attr == "weight":
        y = module._conv_forward(x.to(dw.dtype), dw, None)
    elif attr != "weight" or isinstance(module, (nn.Embedding, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                                 nn.ConvTranspose3d)):
        return None          # a raw parameter of a larger module: its input is not known
    elif dw.dim() == 2 and layout == "in_out" and x.shape[-1] == dw.shape[0]:
        y = x.to(dw.dtype) @ dw
    elif dw.dim() == 2 and layout == "out_in" and x.shape[-1] == dw.shape[1]:
        y = F.linear(x.to(dw.dtype), dw)
    else:
        return None
    return _rms(y) / rx


class SpectralRecorder:
    """train() callback: W_0 at the start; at the end ||W_0|| against init_target and the update,
    in feature space on the probe inputs `x` when given (else, and for matrices whose use is not
    known, ||W_T - W_0||_2), against the target. `plan` gives each parameter's traced layout and fans.
    values: name -> (init ratio, update ratio, the update's statistic: FEATURE or OPERATOR)."""

    def __init__(self, model: torch.nn.Module, plan, x: Optional[torch.Tensor] = None, probe=None):
        self.model, self.plan, self.x, self.probe = model, plan, x, probe
        self.w0: dict[str, torch.Tensor] = {}
        self.values: dict[str, tuple[float, float, str]] = {}
        if probe is not None:       # the probe keeps these modules' inputs: no extra forward pass here
            probe.capture = {n.rpartition(".")[0] for n, *_ in self._params()}

    def _params(self):
        """(name, tensor, layout, fan_in, fan_out) of every matrix, by its *used* layout: a wrong
        `layouts:` declaration is judged against what the forward pass does."""
        for n, p in self.model.named_parameters():
            pp = self.plan.params.get(n)
            if pp is None or pp.role not in ("input", "hidden", "output"):
                continue
            lay = pp.use_layout or pp.layout
            if as_matrix(p, lay) is None:
                continue
            fi, fo = fans(tuple(p.shape), lay)
            yield n, p, lay, fi, fo

    def on_start(self, state) -> None:
        with torch.no_grad():
            self.w0 = {n: p.detach().clone() for n, p, *_ in self._params()}

    def _inputs(self, names: list[str]) -> dict[str, object]:
        """The first input of each parameter's module on the probe batch: kept by the probe's latest
        pass (after the last step), else from a forward pass of its own (eval mode, RNG forked, hooks
        only for this pass)."""
        if self.probe is not None and self.probe.inputs:
            kept = {}
            for m, v in self.probe.inputs.items():
                if v is not None and v[0]._version == v[1]:    # not rewritten in place since it was used
                    kept[m] = v[0]
            return kept
        if self.x is None:
            return {}
        owners = {}
        for n in names:
            mod_name, _, _ = n.rpartition(".")
            try:
                owners[mod_name] = self.model.get_submodule(mod_name)
            except AttributeError:
                continue
        seen: dict[str, object] = {}
        handles = []
        for mod_name, mod in owners.items():
            def pre(module, args, mod_name=mod_name):
                if mod_name not in seen and args:
                    seen[mod_name] = args[0].detach() if torch.is_tensor(args[0]) else None
            handles.append(mod.register_forward_pre_hook(pre))
        was = self.model.training
        devices = [self.x.device] if self.x.device.type == "cuda" else []
        try:
            self.model.eval()
            with torch.random.fork_rng(devices=devices):
                self.model(self.x)
        except Exception:  # noqa: BLE001 - measuring must not break the check: fall back to ||dW||_2
            seen.clear()
        finally:
            for h in handles:
                h.remove()
            self.model.train(was)
        return seen

    def on_end(self, state) -> None:
        with torch.no_grad():
            params = [q for q in self._params() if q[0] in self.w0]
            inputs = self._inputs([q[0] for q in params])
            for n, p, lay, fi, fo in params:
                t = target(fi, fo, lay)
                w0 = size(self.w0[n], lay) / init_target(fi, fo, lay)
                dw = p.detach() - self.w0[n]
                mod_name, _, attr = n.rpartition(".")
                r = None
                if mod_name in inputs:
                    r = feature_ratio(self.model.get_submodule(mod_name), attr, dw, inputs[mod_name], lay)
                if r is not None:
                    self.values[n] = (w0, r, FEATURE)
                else:
                    self.values[n] = (w0, size(dw, lay) / t, OPERATOR)
        self.w0 = {}
