"""Oracle: microsoft/mup (PyPI `mup` 1.0.0) against mutransfer, for an MLP and a transformer built both
ways: mup-style (MuReadout, set_base_shapes, MuAdam/MuSGD) here, ours from the built-in factories.

For every parameter we compare the *effective* init std and LR: mup's MuReadout multiplies its input by
output_mult / width_mult in the forward pass, which by the abc symmetry is a weight of std x c trained
with LR x c (Adam) or LR x c^2 (SGD), c = output_mult / width_mult. Adam's eps is left out (mup keeps it
fixed; we scale it by 1/fan_out). Weight decay is left out too.

1. Every fixed dimension <= the proxy width: wide/proxy ratios of effective init std and LR agree with
   mup and with the rule worked out by hand; the effective LRs agree in absolute value too; and copying
   mup's weights into our model (readout x c) gives the same function before and after optimizer steps.
2. A vocabulary above the width: the LRs still agree, but the readout's init std departs. mup keeps
   muP's 1/fan_in; the spectral rule's min(1, sqrt(fan_out/fan_in)) takes its other branch and gives
   1/sqrt(fan_in). The explain note says so.
"""
import math

import mup
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mutransfer import HParams, parametrize
from mutransfer.models import gpt, mlp

PROXY, WIDE = 64, 256
K = WIDE / PROXY
ALPHA = 2.0          # mup's output_mult, ours multipliers.output_mult
LR = 1e-2


# ---------------------------------------------------------------- mup-style models (written the mup way)
class MuMLP(nn.Module):
    def __init__(self, width, in_dim, out_dim, depth=3):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = mup.MuReadout(width, out_dim, output_mult=ALPHA)

    def forward(self, x):
        h = F.relu(self.inp(x))
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.out(h)


class MuBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc_out = nn.Linear(4 * width, width)

    def forward(self, x):
        B, T, C = x.shape
        d = C // self.heads
        q, k, v = self.attn.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, d).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / d)   # muP: 1/d
        x = x + self.attn.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class MuGPT(nn.Module):
    def __init__(self, width, vocab, seq_len, layers=2, heads=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(MuBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = mup.MuReadout(width, vocab, bias=False, output_mult=ALPHA)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def build_mup(cls, width, **kw):
    torch.manual_seed(0)
    model = cls(width, **kw)
    with torch.device("meta"):
        base, delta = cls(PROXY, **kw), cls(2 * PROXY, **kw)
    mup.set_base_shapes(model, base, delta=delta)
    with torch.no_grad():   # biases start at 0 in both (mup's rescale_linear_bias only rescales them)
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.zero_()
    return model


def readout_mult(model):
    """name -> forward multiplier c of each parameter (MuReadout's output_mult / width_mult)."""
    c = {n: 1.0 for n, _ in model.named_parameters()}
    for mname, m in model.named_modules():
        if isinstance(m, mup.MuReadout):
            c[f"{mname}.weight"] = m.output_mult / m.width_mult()
    return c


def group_lr(opt):
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


def effective(model, opt, c, optimizer):
    """name -> (effective init std, effective LR)."""
    lrs = group_lr(opt)
    out = {}
    for n, p in model.named_parameters():
        power = 1 if optimizer == "adam" else 2
        out[n] = (p.detach().std().item() * c[n], lrs[id(p)] * c[n] ** power)
    return out


def mup_effective(cls, width, optimizer, **kw):
    model = build_mup(cls, width, **kw)
    opt = (mup.MuAdam if optimizer == "adam" else mup.MuSGD)(model.parameters(), lr=LR)
    return effective(model, opt, readout_mult(model), optimizer), model, opt


def ours_effective(factory, width, optimizer, **kw):
    hp = HParams(lr=LR, eps=1e-12, multipliers={"output_mult": ALPHA})
    model, opt, plan = parametrize(factory, width=width, base_width=PROXY, hparams=hp, optimizer=optimizer, args=kw)
    return effective(model, opt, {n: 1.0 for n, _ in model.named_parameters()}, optimizer), model, opt, plan


# ------------------------------------------------------------------------------------- rule by hand
def hand_rule(name, optimizer, head_fan_out, readout):
    """wide/proxy ratios (init std, LR) for a parameter, from the table in docs/rule.md, by hand."""
    if name.startswith(readout) and name.endswith("bias"):
        return None, 1.0                                          # fixed: nothing grows
    if name.endswith("bias") or ".ln" in name or name.startswith("ln"):
        return None, (1.0 if optimizer == "adam" else K)          # vector: fan_in 1, fan_out n
    if name.startswith(("tok.", "pos.")) or name.startswith("inp."):
        return 1.0, (1.0 if optimizer == "adam" else K)           # input: fan_out n, fixed fan_in <= n
    if name.startswith(readout):
        std = 1 / K if head_fan_out <= PROXY else K ** -0.5       # min(1, sqrt(out/in)) branch
        return std, 1 / K                                         # 1/fan_in (Adam), fan_out/fan_in (SGD)
    return K ** -0.5, (1 / K if optimizer == "adam" else 1.0)     # hidden


CASES = {
    "mlp": (MuMLP, mlp, dict(in_dim=32, out_dim=48, depth=3), dict(activation="relu"), "out.", 48),
    "gpt": (MuGPT, gpt, dict(vocab=64, seq_len=16), dict(layers=2, heads=4), "head.", 64),
}


def _kw(case):
    cls, factory, kw, extra, readout, fo = CASES[case]
    return cls, factory, dict(kw), dict(kw, **extra), readout, fo


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("case", ["mlp", "gpt"])
def test_ratios_agree_with_mup_and_the_rule_by_hand(case, optimizer):
    cls, factory, mup_kw, ours_kw, readout, fo = _kw(case)
    m0, *_ = mup_effective(cls, PROXY, optimizer, **mup_kw)
    m1, *_ = mup_effective(cls, WIDE, optimizer, **mup_kw)
    o0, *_ = ours_effective(factory, PROXY, optimizer, **ours_kw)
    o1, *_ = ours_effective(factory, WIDE, optimizer, **ours_kw)
    assert set(m0) == set(o0)
    for n in o0:
        hand_std, hand_lr = hand_rule(n, optimizer, fo, readout)
        # effective LRs: equal in absolute value (same base LR, output_mult converted), hence in ratio
        assert o0[n][1] == pytest.approx(m0[n][1], rel=1e-9), n
        assert o1[n][1] == pytest.approx(m1[n][1], rel=1e-9), n
        assert o1[n][1] / o0[n][1] == pytest.approx(hand_lr, rel=1e-9), n
        if hand_std is None:      # constant inits (biases 0, gains 1) in both
            continue
        mine, theirs = o1[n][0] / o0[n][0], m1[n][0] / m0[n][0]
        assert mine == pytest.approx(theirs, rel=0.08), (n, mine, theirs)
        assert mine == pytest.approx(hand_std, rel=0.08), (n, mine, hand_std)


def _copy_mup_into_ours(mup_model, ours):
    c = readout_mult(mup_model)
    src = dict(mup_model.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            p.copy_(src[n] * c[n])


def _batch(case, n=16):
    g = torch.Generator().manual_seed(1)
    if case == "mlp":
        return torch.randn(n, 32, generator=g), torch.randint(0, 48, (n,), generator=g)
    x = torch.randint(0, 64, (n // 4, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("case", ["mlp", "gpt"])
def test_same_function_and_same_training_steps_as_mup(case, optimizer):
    """mup's model with its weights copied into ours (readout x c): same outputs, and the same outputs
    after two optimizer steps -- the effective LRs of every parameter agree in practice."""
    cls, factory, mup_kw, ours_kw, _, _ = _kw(case)
    _, mm, mopt = mup_effective(cls, WIDE, optimizer, **mup_kw)
    if optimizer == "adam":
        for g in mopt.param_groups:
            g["eps"] = 1e-12
    _, om, oopt, _ = ours_effective(factory, WIDE, optimizer, **ours_kw)
    _copy_mup_into_ours(mm, om)
    x, y = _batch(case)
    torch.testing.assert_close(om(x), mm(x), rtol=1e-4, atol=1e-5)
    for _ in range(2):
        for model, opt in ((mm, mopt), (om, oopt)):
            opt.zero_grad()
            out = model(x)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            opt.step()
    before = om(x)
    torch.testing.assert_close(before, mm(x), rtol=1e-3, atol=1e-4)
    # the check has teeth: a readout LR off by the width ratio gives a different function
    opt = oopt
    for g in opt.param_groups:
        if any(n.startswith(("out.", "head.")) for n in g["names"]):
            g["lr"] *= K
    opt.zero_grad()
    out = om(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    opt.step()
    mopt.zero_grad()
    out = mm(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    mopt.step()
    assert not torch.allclose(om(x), mm(x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_vocab_above_the_width_is_where_the_rule_and_mup_part(optimizer):
    """vocab 512 > widths 64, 256: the readout has fan_out > fan_in. mup keeps muP's init ~ 1/fan_in;
    the spectral rule gives 1/sqrt(fan_in) (its min(1, .) takes the other branch). LRs still agree."""
    kw = dict(vocab=512, seq_len=16)
    m0, *_ = mup_effective(MuGPT, PROXY, optimizer, **kw)
    m1, *_ = mup_effective(MuGPT, WIDE, optimizer, **kw)
    o0, *_, plan0 = ours_effective(gpt, PROXY, optimizer, layers=2, heads=4, **kw)
    o1, *_, plan1 = ours_effective(gpt, WIDE, optimizer, layers=2, heads=4, **kw)
    for n in o0:
        assert o1[n][1] / o0[n][1] == pytest.approx(m1[n][1] / m0[n][1], rel=1e-9), n
        if n.endswith("bias") or "ln" in n:
            continue
        std_ours, std_mup = o1[n][0] / o0[n][0], m1[n][0] / m0[n][0]
        if n == "head.weight":
            assert std_mup == pytest.approx(1 / K, rel=0.08)           # muP: 1/fan_in
            assert std_ours == pytest.approx(K ** -0.5, rel=0.08)      # spectral: 1/sqrt(fan_in)
        else:
            assert std_ours == pytest.approx(std_mup, rel=0.08), n
    for plan in (plan0, plan1):
        assert "not muP's 1/fan_in" in plan.params["head.weight"].note
        assert all(p.note is None for n, p in plan.params.items() if n != "head.weight")
    # and the proxy itself starts the readout at the rule's std, sqrt(fan_out/fan_in) capped at 1
    assert plan0.params["head.weight"].init_std == pytest.approx(ALPHA / math.sqrt(PROXY))


class MuTiedGPT(MuGPT):
    def __init__(self, width, vocab, seq_len, layers=2, heads=4):
        super().__init__(width, vocab, seq_len, layers, heads)
        self.head = mup.MuSharedReadout(self.tok.weight, bias=False, output_mult=ALPHA)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_tied_readout_ratios_agree_with_mup_shared_readout(optimizer):
    """Tied embedding/readout: mup's MuSharedReadout (forward x output_mult/width_mult) against our
    forward pre-hook. Effective readout init std and LR (table x factor; factor^2 under SGD) move by
    the same wide/proxy ratio, 1/k, while vocab <= width."""
    eff = {}
    for width in (PROXY, WIDE):
        model = build_mup(MuTiedGPT, width, vocab=64, seq_len=16)
        with torch.no_grad():   # mup's examples initialise after set_base_shapes (its readout rescale
            model.tok.weight.normal_(0, 1)   # would otherwise also scale the shared table)
        opt = (mup.MuAdam if optimizer == "adam" else mup.MuSGD)(model.parameters(), lr=LR)
        c = model.head.output_mult / model.head.width_mult()
        lr = group_lr(opt)[id(model.tok.weight)]
        mine_model, mine_opt, plan = parametrize(gpt, width=width, base_width=PROXY, optimizer=optimizer,
                                                 hparams=HParams(lr=LR, multipliers={"output_mult": ALPHA}),
                                                 args=dict(layers=2, heads=4, vocab=64, seq_len=16, tied=True))
        h = plan.readout_multipliers["head"]
        mine_lr = group_lr(mine_opt)[id(mine_model.tok.weight)]
        p = 1 if optimizer == "adam" else 2
        eff[width] = (model.tok.weight.std().item() * c, lr * c ** p,
                      mine_model.tok.weight.std().item() * h, mine_lr * h ** p)
    r = [eff[WIDE][i] / eff[PROXY][i] for i in range(4)]
    assert r[0] == pytest.approx(1 / K, rel=0.08) and r[2] == pytest.approx(1 / K, rel=0.08)   # init
    assert r[1] == pytest.approx(1 / K) and r[3] == pytest.approx(1 / K)                         # LR
