"""The per-parameter plan: the proxy is a plain model, other widths are the proxy times the rule's
ratios, multipliers follow the abc symmetry, weight decay is independent (AdamW, SGD) or rule-scaled
L2 (Adam)."""
import math

import pytest

from mutransfer import HParams, make_plan, spectral
from mutransfer.engine.shapes import infer_shapes
from mutransfer.models import gpt

ARGS = dict(layers=1, heads=2, vocab=16, seq_len=8)
HP = HParams(lr=2e-3, eps=1e-7, weight_decay=0.1, init_scale=1.5)


def plan_at(width, base=32, hp=HP, optimizer="adamw", args=ARGS, parametrization="mup"):
    return make_plan(infer_shapes(gpt, args, base, width), hp, optimizer, parametrization)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_proxy_is_a_plain_model(optimizer):
    """At the proxy width, multipliers 1: one global LR, eps and weight decay; the rule's init."""
    for base in (32, 64):
        p = plan_at(base, base, optimizer=optimizer)
        assert {x.lr for x in p.params.values()} == {HP.lr}
        assert {x.weight_decay for x in p.params.values()} == {HP.weight_decay}
        assert {x.eps for x in p.params.values()} == ({None} if optimizer == "sgd" else {HP.eps})
        for x in p.params.values():
            if x.init == "normal":
                fi, fo = x.fan_in, x.fan_out
                assert x.init_std == pytest.approx(HP.init_scale * spectral.init_std(fi, fo))
            else:
                assert x.init_std == 0.0 and x.init == ("ones" if "ln" in x.name and "weight" in x.name else "zeros")


def test_wider_is_the_proxy_times_the_rule_by_hand():
    p0, p1 = plan_at(32), plan_at(128)         # k = 4
    hid0, hid1 = p0.params["blocks.0.attn.qkv.weight"], p1.params["blocks.0.attn.qkv.weight"]
    assert hid1.init_std / hid0.init_std == pytest.approx(0.5)
    assert hid1.lr / hid0.lr == pytest.approx(0.25)
    assert hid1.eps / hid0.eps == pytest.approx(0.25)
    emb0, emb1 = p0.params["tok.weight"], p1.params["tok.weight"]
    assert (emb1.init_std, emb1.lr) == (emb0.init_std, emb0.lr)
    assert emb1.eps / emb0.eps == pytest.approx(0.25)
    out0, out1 = p0.params["head.weight"], p1.params["head.weight"]
    assert out1.init_std / out0.init_std == pytest.approx(0.25)     # vocab 16 <= 32: muP's 1/fan_in
    assert out1.lr / out0.lr == pytest.approx(0.25)
    assert out1.eps == out0.eps                                      # fan_out fixed
    sgd0, sgd1 = plan_at(32, optimizer="sgd"), plan_at(128, optimizer="sgd")
    ratio = {n: sgd1.params[n].lr / sgd0.params[n].lr for n in sgd0.params}
    assert ratio["tok.weight"] == pytest.approx(4) and ratio["blocks.0.ln1.bias"] == pytest.approx(4)
    assert ratio["blocks.0.fc.weight"] == pytest.approx(1) and ratio["head.weight"] == pytest.approx(0.25)


def test_multipliers_follow_the_abc_symmetry():
    m = 3.0
    base = plan_at(128, hp=HParams(lr=1e-3))
    fwd = plan_at(128, hp=HParams(lr=1e-3, multipliers={"output_mult": m}))
    o, f = base.params["head.weight"], fwd.params["head.weight"]
    assert (f.init_std / o.init_std, f.lr / o.lr, f.eps / o.eps) == pytest.approx((m, m, 1 / m))   # Adam
    sgd_o = plan_at(128, hp=HParams(lr=1e-3), optimizer="sgd").params["head.weight"]
    sgd_f = plan_at(128, hp=HParams(lr=1e-3, multipliers={"output_mult": m}), optimizer="sgd").params["head.weight"]
    assert (sgd_f.init_std / sgd_o.init_std, sgd_f.lr / sgd_o.lr) == pytest.approx((m, m * m))     # SGD
    sep = plan_at(128, hp=HParams(lr=1e-3, multipliers={"hidden_lr": 2.0, "hidden_init": 0.5}))
    for n, x in sep.params.items():
        y = base.params[n]
        hidden = x.role == "hidden"
        assert x.lr == pytest.approx(y.lr * (2.0 if hidden else 1.0)), n
        if x.init == "normal":
            assert x.init_std == pytest.approx(y.init_std * (0.5 if hidden else 1.0)), n


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_independent_weight_decay(optimizer):
    hp = HParams(lr=1e-3, weight_decay=0.1, multipliers={"output_mult": 2.0, "hidden_lr": 3.0})
    for w in (32, 128, 512):
        for x in plan_at(w, hp=hp, optimizer=optimizer).params.values():
            assert x.lr * x.weight_decay == pytest.approx(1e-3 * 0.1), (w, x.name)


def test_adam_coupled_l2_scales_like_the_gradient_over_the_weight():
    p0 = plan_at(32, optimizer="adam")
    p1 = plan_at(128, optimizer="adam")
    r = {n: p1.params[n].weight_decay / p0.params[n].weight_decay for n in p0.params}
    assert r["blocks.0.attn.proj.weight"] == pytest.approx(0.5)   # hidden: (1/n) / (1/sqrt n)
    assert r["tok.weight"] == pytest.approx(0.25)                  # input: (1/n) / 1
    assert r["head.weight"] == pytest.approx(4.0)                  # output: 1 / (1/n)
    assert r["blocks.0.ln1.weight"] == pytest.approx(0.25)         # vector: (1/n) / 1
    fwd = plan_at(32, optimizer="adam", hp=HParams(weight_decay=0.1, multipliers={"output_mult": 2.0}))
    assert fwd.params["head.weight"].weight_decay == pytest.approx(0.1 / 4)   # L2 on w' = W/m


def test_standard_parametrization_control():
    mup0, sp0, sp1 = plan_at(32), plan_at(32, parametrization="sp"), plan_at(128, parametrization="sp")
    for n, x in sp0.params.items():
        assert (x.init_std, x.lr, x.eps, x.weight_decay) == (
            mup0.params[n].init_std, mup0.params[n].lr, mup0.params[n].eps, mup0.params[n].weight_decay)
        y = sp1.params[n]
        assert (y.lr, y.eps) == (x.lr, x.eps)
        if x.init == "normal":
            assert y.init_std / x.init_std == pytest.approx(math.sqrt(x.fan_in / y.fan_in))


def test_zero_readout():
    p = plan_at(128, hp=HParams(zero_readout=True))
    assert (p.params["head.weight"].init, p.params["head.weight"].init_std) == ("zeros", 0.0)
    assert p.params["blocks.0.fc.weight"].init == "normal"
    tied = plan_at(128, hp=HParams(zero_readout=True), args=dict(ARGS, tied=True))
    assert tied.params["tok.weight"].init == "normal"
    assert any("zero_readout ignored" in n for n in tied.notes)


def test_tied_readout_multiplier_by_hand():
    args = dict(ARGS, tied=True)
    # the readout input is aligned with the table: multiplier 1/d whatever the vocabulary
    assert plan_at(32, args=args).readout_multipliers == {"head": pytest.approx(1 / 32)}
    # d=128: 1/128, times the output multipliers, over input_mult (folded into the table)
    hp = HParams(multipliers={"output_mult": 2.0, "output_init": 1.5, "input_mult": 4.0})
    p = plan_at(128, args=args, hp=hp)
    assert p.readout_multipliers["head"] == pytest.approx(1 / 128 * 2.0 * 1.5 / 4.0)
    assert "tied" in p.params["tok.weight"].note
    big = plan_at(128, args=dict(ARGS, tied=True, vocab=200))      # vocab > width: the same rule
    assert big.readout_multipliers["head"] == pytest.approx(1 / 128)
    sp = plan_at(128, args=dict(ARGS, tied=True, vocab=200), parametrization="sp")
    assert sp.readout_multipliers["head"] == pytest.approx(1 / 32)   # the control keeps the proxy's


def test_to_json_has_the_documented_fields():
    d = plan_at(64).to_json()
    assert d["width"] == 64 and d["base_width"] == 32
    keys = {"name", "shape", "base_shape", "role", "fan_in", "fan_out", "init_std", "lr", "weight_decay", "eps"}
    for row in d["params"]:
        assert keys <= set(row)
        assert row["role"] in ("input", "hidden", "output", "vector", "fixed")
