"""The rule itself (spectral.py), checked by hand against Parametrization 1 of the spectral paper."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mutransfer.engine import spectral


def test_init_std_is_min_one_sqrt_ratio_over_sqrt_fan_in():
    # fan_out >= fan_in: min(1, .) = 1 -> 1/sqrt(fan_in)
    assert spectral.init_std(4, 16) == pytest.approx(0.5)
    assert spectral.init_std(64, 64) == pytest.approx(1 / 8)
    # fan_out < fan_in: sqrt(fan_out/fan_in)/sqrt(fan_in) = sqrt(fan_out)/fan_in
    assert spectral.init_std(16, 4) == pytest.approx(2 / 16)
    assert spectral.init_std(1024, 10) == pytest.approx(math.sqrt(10) / 1024)
    # one-hot inputs (embeddings, biases): fan_in 1 -> std 1
    assert spectral.init_std(1, 512) == pytest.approx(1.0)


def test_lr_scales():
    assert spectral.lr_scale(128, 512, "sgd") == pytest.approx(4.0)
    assert spectral.lr_scale(512, 128, "sgd") == pytest.approx(0.25)
    for opt in ("adam", "adamw"):
        assert spectral.lr_scale(128, 512, opt) == pytest.approx(1 / 128)
        assert spectral.lr_scale(1, 512, opt) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        spectral.lr_scale(2, 2, "lion")


def test_eps_and_l2_scales():
    assert spectral.eps_scale(7, 256) == pytest.approx(1 / 256)
    # coupled L2 under Adam: 1 / (fan_out * init_std)
    assert spectral.l2_scale(64, 64) == pytest.approx(1 / (64 * (1 / 8)))       # hidden: ~ 1/sqrt(n)
    assert spectral.l2_scale(1, 256) == pytest.approx(1 / 256)                   # embedding: ~ 1/n
    assert spectral.l2_scale(256, 10) == pytest.approx(1 / (10 * math.sqrt(10) / 256))  # readout: ~ n


def test_fans_below_one_are_rejected():
    for fn in (spectral.init_std, spectral.eps_scale, spectral.l2_scale):
        with pytest.raises(ValueError):
            fn(0, 3)
    with pytest.raises(ValueError):
        spectral.lr_scale(3, 0, "sgd")


def test_recovers_mup_table_3_when_fixed_dims_are_one():
    """Setting n0 = nL = 1 and hidden widths n: Parametrization 1 is muP (Tensor Programs V, Table 3)."""
    n, k = 256, 4   # ratio to a 4x wider model
    # (fan_in, fan_out) of input, hidden, output at width n and k*n
    layers = {"input": ((1, n), (1, k * n)), "hidden": ((n, n), (k * n, k * n)), "output": ((n, 1), (k * n, 1))}
    want_std = {"input": 1.0, "hidden": k ** -0.5, "output": 1 / k}     # muP: 1, 1/sqrt(n), 1/n
    want_sgd = {"input": k, "hidden": 1.0, "output": 1 / k}              # muP SGD: n, 1, 1/n
    want_adam = {"input": 1.0, "hidden": 1 / k, "output": 1 / k}         # muP Adam: 1, 1/n, 1/n
    for role, (base, new) in layers.items():
        std_r, sgd_r, _ = spectral.ratios(base, new, "sgd")
        _, adam_r, _ = spectral.ratios(base, new, "adam")
        assert std_r == pytest.approx(want_std[role]), role
        assert sgd_r == pytest.approx(want_sgd[role]), role
        assert adam_r == pytest.approx(want_adam[role]), role


def test_ratios_are_the_quotient_of_the_formulas():
    base, new = (32, 96), (128, 384)
    s, l, e = spectral.ratios(base, new, "adamw")
    assert s == pytest.approx(spectral.init_std(*new) / spectral.init_std(*base))
    assert l == pytest.approx(base[0] / new[0])
    assert e == pytest.approx(base[1] / new[1])
    assert spectral.l2_ratio(base, new) == pytest.approx(spectral.l2_scale(*new) / spectral.l2_scale(*base))


def test_independent_weight_decay_keeps_lr_times_wd():
    for group_lr in (1e-4, 3e-3, 0.5):
        wd = spectral.independent_weight_decay(0.1, 1e-3, group_lr)
        assert group_lr * wd == pytest.approx(1e-3 * 0.1)
    assert spectral.independent_weight_decay(0.1, 1e-3, 0.0) == 0.0


def test_mup_departure_only_where_a_fixed_dim_exceeds_the_width():
    assert spectral.mup_departure("output", 128, 10) is None
    assert "1/sqrt(fan_in)" in spectral.mup_departure("output", 128, 256)
    assert spectral.mup_departure("input", 1, 128) is None          # embedding
    assert spectral.mup_departure("input", 16, 128) is None
    assert spectral.mup_departure("input", 784, 128) is not None    # wide input
    assert spectral.mup_departure("hidden", 512, 128) is None


@pytest.mark.parametrize("module,check", [("spectral", "m.init_std(4, 16) == 0.5"),
                                          ("depth", "m.branch_multiplier(2, 8, 1.0) == 0.25")])
def test_rule_modules_import_no_torch(module, check):
    """The rules are pure functions a reader can check against their source: no torch (nor anything of
    the package) needed to import and run them."""
    path = Path(__file__).resolve().parents[1] / "mutransfer" / "engine" / f"{module}.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('rule_alone', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"assert {check}\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
