"""Applying the plan to real models: init, optimizer groups, tied readouts, raw parameters, convs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mutransfer import HParams, parametrize, spectral
from mutransfer.models import cnn, gpt, mlp

GPT = dict(layers=1, heads=2, vocab=16, seq_len=8)


def measured_std(model):
    return {n: p.detach().std().item() for n, p in model.named_parameters() if p.numel() > 1}


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_proxy_width_is_a_plain_model(optimizer):
    """Multipliers 1 at the proxy: one optimizer group with the global LR, eps and decay; the rule's init;
    no hooks; the same at any proxy width -- nothing depends on width."""
    hp = HParams(lr=2e-3, eps=1e-7, weight_decay=0.05, momentum=0.9)
    for width in (32, 64):
        model, opt, plan = parametrize(gpt, width=width, base_width=width, hparams=hp, optimizer=optimizer, args=GPT)
        assert len(opt.param_groups) == 1
        g = opt.param_groups[0]
        assert (g["lr"], g["weight_decay"]) == (hp.lr, hp.weight_decay)
        assert g.get("eps", None) == (None if optimizer == "sgd" else hp.eps)
        assert type(opt) is {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
        params = dict(model.named_parameters())
        for n, pp in plan.params.items():
            p = params[n]
            if pp.init == "zeros":
                assert torch.all(p == 0), n
            elif pp.init == "ones":
                assert torch.all(p == 1), n
            else:
                assert pp.init_std == pytest.approx(spectral.init_std(pp.fan_in, pp.fan_out))
                assert p.std().item() == pytest.approx(pp.init_std, rel=0.1), n


def test_init_matches_the_plan_at_a_wider_width_and_is_deterministic():
    model, _, plan = parametrize(gpt, width=128, base_width=32, args=GPT, seed=3)
    std = measured_std(model)
    for n, pp in plan.params.items():
        if pp.init == "normal":
            assert std[n] == pytest.approx(pp.init_std, rel=0.1), n
    again, _, _ = parametrize(gpt, width=128, base_width=32, args=GPT, seed=3)
    other, _, _ = parametrize(gpt, width=128, base_width=32, args=GPT, seed=4)
    assert torch.equal(model.blocks[0].fc.weight, again.blocks[0].fc.weight)
    assert not torch.equal(model.blocks[0].fc.weight, other.blocks[0].fc.weight)


def test_init_of_a_parameter_does_not_depend_on_the_others():
    """Seeds are per parameter name: adding a layer leaves the other layers' draws unchanged."""
    a, _, _ = parametrize(mlp, width=32, base_width=32, args=dict(in_dim=4, out_dim=3, depth=2))
    b, _, _ = parametrize(mlp, width=32, base_width=32, args=dict(in_dim=4, out_dim=3, depth=3))
    assert torch.equal(a.inp.weight, b.inp.weight)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_tied_embedding_readout(optimizer):
    """The shared tensor follows the embedding rule; a forward pre-hook multiplies the readout's input
    by output_mult / width (its input is aligned with the table). Effective readout init std and LR
    (hook x tensor): 1/width at every width, so ratios 1/k."""
    hp = HParams(lr=1e-2, multipliers={"output_mult": 2.0})
    eff = {}
    for width in (32, 128):
        model, opt, plan = parametrize(gpt, width=width, base_width=32, hparams=hp, optimizer=optimizer,
                                       args=dict(GPT, tied=True))
        assert model.head.weight is model.tok.weight
        mult = plan.readout_multipliers["head"]
        assert len(model.head._forward_pre_hooks) == 1
        lr = next(g["lr"] for g in opt.param_groups if "tok.weight" in g["names"])
        eff_lr = lr * (mult if optimizer == "adam" else mult * mult)
        eff_std = model.tok.weight.std().item() * mult
        assert eff_std == pytest.approx(2.0 * spectral.init_std(1, width) / width, rel=0.1)
        eff[width] = (eff_std, eff_lr)
        # the hook multiplies the readout's input: output = ln_f(x) * mult @ W^T
        idx = torch.randint(0, 16, (2, 8))
        h = {}
        model.ln_f.register_forward_hook(lambda m, a, out: h.setdefault("x", out))
        torch.testing.assert_close(model(idx), F.linear(h["x"] * mult, model.tok.weight))
    assert eff[128][0] / eff[32][0] == pytest.approx(0.25, rel=0.1)     # readout init ~ 1/fan_in (any vocab)
    assert eff[128][1] / eff[32][1] == pytest.approx(0.25)              # Adam 1/fan_in; SGD fan_out/fan_in


class Raw(nn.Module):
    def __init__(self, width, vocab=20, out=3):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab, width))   # used by indexing
        self.w = nn.Parameter(torch.zeros(width, width))       # used as x @ W
        self.w_out = nn.Parameter(torch.zeros(width, out))     # used as x @ W
        self.gain = nn.Parameter(torch.full((width,), 2.0))

    def forward(self, idx):
        return torch.relu((self.table[idx] * self.gain) @ self.w) @ self.w_out


def test_raw_parameters_with_layouts():
    lay = {"table": "embedding", "w*": "in_out"}
    stds = {}
    for width in (64, 256):
        model, opt, plan = parametrize(lambda width: Raw(width), width=width, base_width=64, layouts=lay,
                                       hparams=HParams(lr=1e-3), optimizer="adam")
        std = measured_std(model)
        assert std["table"] == pytest.approx(1.0, rel=0.1)
        assert std["w"] == pytest.approx(spectral.init_std(width, width), rel=0.1)
        assert std["w_out"] == pytest.approx(spectral.init_std(width, 3), rel=0.1)
        assert torch.all(model.gain == 2.0)                    # a raw vector keeps the factory's init
        lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
        assert lrs["table"] == pytest.approx(1e-3) and lrs["w_out"] == pytest.approx(1e-3 * 64 / width)
        stds[width] = std
        h = model(torch.randint(0, 20, (512,)))
        assert h.shape == (512, 3) and 0.05 < h.std().item() < 20
    assert stds[256]["w_out"] / stds[64]["w_out"] == pytest.approx(0.25, rel=0.1)


def test_without_layouts_the_raw_matrices_are_read_the_wrong_way():
    """The guess (out, in) is wrong for x @ W: that is why the warning asks for `layouts`."""
    with pytest.warns(UserWarning):
        _, _, plan = parametrize(lambda width: Raw(width), width=256, base_width=64)
    assert plan.params["w_out"].role == "input" and plan.params["table"].role == "output"


class Unequal(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.d = nn.Linear(width, 2)


def test_unequal_hidden_widths_and_convs_follow_the_rule():
    model, _, plan = parametrize(lambda width: Unequal(width), width=64, base_width=16, optimizer="adam")
    std = measured_std(model)
    assert std["b.weight"] == pytest.approx(1 / 8, rel=0.1)                    # fan_out > fan_in: 1/sqrt(64)
    assert std["c.weight"] == pytest.approx(0.5 / 16, rel=0.1)                 # sqrt(1/4)/sqrt(256)
    assert plan.params["c.weight"].lr == pytest.approx(1e-3 * 64 / 256)        # 1/fan_in from the proxy's
    model, _, plan = parametrize(cnn, width=32, base_width=8, args=dict(in_channels=3, classes=5, blocks=1))
    std = measured_std(model)
    assert std["stem.weight"] == pytest.approx(1 / 27 ** 0.5, rel=0.1)        # fan_in 3*3*3
    # (out, in*k*k) = (32, 288): fan_out < fan_in, so sqrt(32/288)/sqrt(288) -- 1/3 of Kaiming's 1/sqrt(288)
    assert std["blocks.0.conv.weight"] == pytest.approx((32 / 288) ** 0.5 / 288 ** 0.5, rel=0.1)
    out = model(torch.randn(4, 3, 8, 8))
    assert out.shape == (4, 5) and torch.isfinite(out).all()


def test_param_groups_carry_names_and_initial_lr():
    _, opt, plan = parametrize(gpt, width=64, base_width=32, args=GPT)
    names = [n for g in opt.param_groups for n in g["names"]]
    assert sorted(names) == sorted(plan.params)
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        assert all(plan.params[n].lr == g["lr"] for n in g["names"])


class Padded(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.emb = nn.Embedding(10, width, padding_idx=0)
        self.out = nn.Linear(width, 3)


def test_embedding_padding_row_stays_zero():
    model, _, _ = parametrize(lambda width: Padded(width), width=32, base_width=16)
    assert torch.all(model.emb.weight[0] == 0) and model.emb.weight[1:].std() > 0.5


def test_a_parameter_declared_fixed_keeps_its_factory_init():
    def factory(width):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))
    model, _, plan = parametrize(factory, width=32, base_width=16, layouts={"0.weight": "fixed"})
    assert plan.params["0.weight"].init == "keep" and plan.params["0.weight"].init_std is None
    assert torch.equal(model[0].weight, factory(32)[0].weight)
