"""The spectral condition itself, measured: at several widths, ||W||_2 at init and ||dW||_2 after one
optimizer step (Adam and SGD) scale like sqrt(fan_out / fan_in) for the input, hidden and output
matrices of an MLP -- the log-log slope against width is that of sqrt(fan_out/fan_in): +1/2, 0, -1/2.
The standard-parametrization control fails the same measurement, so the check can fail."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mutransfer import HParams, parametrize
from mutransfer.models import mlp

WIDTHS = [64, 128, 256, 512]
IN, OUT = 2, 2
LAYERS = {"input": "inp.weight", "hidden": "hidden.0.weight", "output": "out.weight"}


def measure(width, optimizer, parametrization="mup"):
    """role -> (||W||_2 at init, ||dW||_2 after one step, sqrt(fan_out/fan_in) from the plan)."""
    lr = 0.05 if optimizer == "sgd" else 1e-2
    model, opt, plan = parametrize(mlp, width=width, base_width=WIDTHS[0], hparams=HParams(lr=lr),
                                   optimizer=optimizer, args=dict(in_dim=IN, out_dim=OUT, depth=2, bias=False),
                                   parametrization=parametrization)
    params = dict(model.named_parameters())
    before = {r: params[n].detach().clone() for r, n in LAYERS.items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, IN, generator=g), torch.randint(0, OUT, (32,), generator=g)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    out = {}
    for r, n in LAYERS.items():
        pp = plan.params[n]
        out[r] = (
            torch.linalg.matrix_norm(before[r], 2).item(),
            torch.linalg.matrix_norm(params[n].detach() - before[r], 2).item(),
            math.sqrt(pp.fan_out / pp.fan_in),
        )
    return out


def slopes(optimizer, parametrization="mup"):
    rows = [measure(w, optimizer, parametrization) for w in WIDTHS]
    logw = np.log(WIDTHS)
    fit = lambda v: float(np.polyfit(logw, np.log(v), 1)[0])  # noqa: E731
    return {r: tuple(fit([row[r][k] for row in rows]) for k in range(3)) for r in LAYERS}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_norms_scale_like_sqrt_fan_out_over_fan_in(optimizer):
    s = slopes(optimizer)
    want = {"input": 0.5, "hidden": 0.0, "output": -0.5}
    for role, (init, update, target) in s.items():
        assert target == pytest.approx(want[role], abs=1e-9)         # the fans say so ...
        assert init == pytest.approx(target, abs=0.1), (role, "||W||", init)        # ... and so do the norms
        assert update == pytest.approx(target, abs=0.1), (role, "||dW||", update)


def test_standard_parametrization_fails_the_same_measurement():
    s = slopes("adam", "sp")
    # SP: readout init ~ 1/sqrt(fan_in) gives ||W|| ~ 1 (slope 0, not -1/2), and a fixed Adam LR makes
    # hidden updates grow like the width (slope 1, not 0)
    assert abs(s["output"][0] - (-0.5)) > 0.35
    assert abs(s["hidden"][1] - 0.0) > 0.7


def test_adam_l2_keeps_its_size_next_to_the_gradient():
    """Adam's coupled L2 (weight_decay of torch.optim.Adam) enters as wd * W next to the gradient g and
    is normalised with it. With the rule's scaling the entrywise ratio rms(wd * W) / rms(g) is flat in
    width for every layer; with a fixed wd it drifts like n (input), sqrt(n) (hidden), 1/n (output)."""
    ratio = {"rule": [], "fixed": []}
    for w in WIDTHS:
        model, opt, _ = parametrize(mlp, width=w, base_width=WIDTHS[0], optimizer="adam",
                                    hparams=HParams(lr=1e-3, weight_decay=0.1),
                                    args=dict(in_dim=IN, out_dim=OUT, depth=2, bias=False))
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, IN, generator=g), torch.randint(0, OUT, (32,), generator=g)
        F.cross_entropy(model(x), y).backward()
        wd = {n: grp["weight_decay"] for grp in opt.param_groups for n in grp["names"]}
        params = dict(model.named_parameters())
        rms = lambda t: t.detach().pow(2).mean().sqrt().item()  # noqa: E731
        for mode in ratio:
            ratio[mode].append({r: (wd[n] if mode == "rule" else 0.1) * rms(params[n]) / rms(params[n].grad)
                                for r, n in LAYERS.items()})
    logw = np.log(WIDTHS)
    slope = {m: {r: float(np.polyfit(logw, np.log([row[r] for row in rows]), 1)[0]) for r in LAYERS}
             for m, rows in ratio.items()}
    for r in LAYERS:
        assert abs(slope["rule"][r]) < 0.15, (r, slope)
    assert slope["fixed"]["input"] > 0.8 and slope["fixed"]["hidden"] > 0.3 and slope["fixed"]["output"] < -0.8
