"""Mixture of experts and stacked weights: a parameter whose leading dims the forward pass indexes or
batches over is a stack of matrices, planned slice by slice (per-slice fans, init, LR, eps); the
built-in moe-gpt and transformers MoE architectures (built from configs, no `layouts:`) get the dense
rule's numbers per expert; the router is a readout; the dry run counts FLOPs; auxiliary losses are part
of the objective; the coordinate check passes the MoE under muP and flags SP and the old 2-D reading."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from mutransfer.cli import app
from mutransfer.engine import experts as rule
from mutransfer.engine import spectral
from mutransfer.engine.hparams import HParams
from mutransfer.engine.plan import make_plan
from mutransfer.engine.shapes import fans, infer_shapes
from mutransfer.engine.trace import layout_from_use, trace_uses
from mutransfer.errors import UserError
from mutransfer.models import moe_gpt
from mutransfer.run.train import TrainConfig, train

TOK = torch.randint(0, 256, (2, 16))


# ----------------------------------------------------------------------------- stacks, traced by use

class Stacks(nn.Module):
    """Every way a stack of matrices is used: an expert loop (w[e] through F.linear, with its bias
    stack), gathered slices through bmm, einsum with a batch letter, fused heads (3, out, in), and
    scanned layers (L, in, out) used as x @ W[l]."""

    def __init__(self, width, e=4, din=8):
        super().__init__()
        self.inp = nn.Linear(din, width)
        self.loop_w = nn.Parameter(torch.randn(e, 2 * width, width) / width**0.5)
        self.loop_b = nn.Parameter(torch.zeros(e, 2 * width))
        self.gath_w = nn.Parameter(torch.randn(e, width, 2 * width) / width**0.5)
        self.ein_w = nn.Parameter(torch.randn(e, width, width) / width**0.5)
        self.fused = nn.Parameter(torch.randn(3, width, width) / width**0.5)
        self.scan = nn.Parameter(torch.randn(2, width, width) / width**0.5)    # (layer, in, out)
        self.out = nn.Linear(width, 4)
        self.e = e

    def forward(self, x):
        h = self.inp(x)                                            # (n, width)
        ids = torch.arange(h.shape[0]) % self.e
        a = torch.stack([F.linear(h[i:i + 1], self.loop_w[int(ids[i])], self.loop_b[int(ids[i])])[0]
                         for i in range(h.shape[0])])              # (n, 2 width)
        w = self.gath_w[ids]                                       # (n, width, 2 width)
        h = torch.bmm(w, a.unsqueeze(-1)).squeeze(-1)              # (n, width)
        hx = h.unsqueeze(0).expand(self.e, -1, -1)                 # (e, n, width): a copy per expert
        h = torch.einsum("end,eod->eno", hx, self.ein_w).mean(0)   # e batched (activations and output)
        q, k, v = (F.linear(h, self.fused[j]) for j in range(3))
        h = q + k + v
        for layer in range(self.scan.shape[0]):
            h = torch.relu(h @ self.scan[layer])
        return self.out(h)


def test_stacks_are_recognised_by_use_with_per_slice_fans():
    s = infer_shapes(Stacks, {}, 16, 64, example=torch.randn(6, 8))
    got = {n: (p.layout, p.role, p.fan_in, p.fan_out) for n, p in s.params.items()}
    assert got["loop_w"] == ("stacked out_in", "hidden", 64, 128)
    assert got["loop_b"] == ("stacked vector", "vector", 1, 128)
    assert got["gath_w"] == ("stacked out_in", "hidden", 128, 64)
    assert got["ein_w"] == ("stacked out_in", "hidden", 64, 64)
    assert got["fused"] == ("stacked out_in", "hidden", 64, 64)
    assert got["scan"] == ("stacked in_out", "hidden", 64, 64)
    assert all(s.params[n].source == "traced" for n in ("loop_w", "gath_w", "ein_w", "fused", "scan"))
    assert s.unknown == []


def test_fans_of_stacked_layouts_and_a_declared_stack():
    assert fans((4, 512, 256), "stacked out_in") == (256, 512)
    assert fans((4, 256, 512), "stacked in_out") == (256, 512)
    assert fans((2, 4, 512, 256), "stacked out_in") == (256, 512)     # two stacked dims
    assert fans((4, 512), "stacked vector") == (1, 512)
    assert fans((4, 512, 256), "out_in") == (512 * 256, 4)           # the old, wrong reading
    s = infer_shapes(Stacks, {}, 16, 64, layouts={"scan": "stacked out_in"}, warn=False,
                     example=torch.randn(6, 8))
    assert (s.params["scan"].layout, s.params["scan"].source, s.params["scan"].use_layout) == \
        ("stacked out_in", "declared", "stacked in_out")
    with pytest.raises(UserError, match=r"layouts\.inp\.weight.*needs at least 3 dimensions"):
        infer_shapes(Stacks, {}, 16, 64, layouts={"inp.weight": "stacked out_in"}, warn=False,
                     example=torch.randn(6, 8))


def test_a_two_d_table_looked_up_by_ids_is_still_an_embedding():
    class Tab(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.table = nn.Parameter(torch.randn(50, width))
            self.out = nn.Linear(width, 3)

        def forward(self, ids):
            return self.out(self.table[ids])

    s = infer_shapes(Tab, {}, 16, 64, example=torch.randint(0, 50, (2, 5)))
    assert (s.params["table"].layout, s.params["table"].role) == ("embedding", "input")


# ------------------------------------------------------------------------------------ the built-in MoE

def test_builtin_moe_plan_by_hand():
    args = {"layers": 1, "head_dim": 16, "vocab": 256, "seq_len": 16, "experts": 4, "top_k": 2}
    proxy = make_plan(infer_shapes(moe_gpt, args, 64, 64, example=TOK), HParams(lr=1e-2, eps=1e-8), "adamw")
    target = make_plan(infer_shapes(moe_gpt, args, 64, 256, example=TOK), HParams(lr=1e-2, eps=1e-8), "adamw")
    for n in ("blocks.0.moe.w_in", "blocks.0.moe.w_out"):
        p0, p = proxy.params[n], target.params[n]
        assert (p.layout, p.role, p.fan_in, p.fan_out) == ("stacked out_in", "hidden", 256, 256)
        assert p0.init_std == pytest.approx(1 / 8)                 # 1/sqrt(64), not 1/sqrt(4 x 64 x 64)
        assert p.init_std / p0.init_std == pytest.approx(1 / 2)
        assert p.lr / p0.lr == pytest.approx(1 / 4) and p.eps / p0.eps == pytest.approx(1 / 4)
    r0, r = proxy.params["blocks.0.moe.router.weight"], target.params["blocks.0.moe.router.weight"]
    assert (r.role, r.fan_in, r.fan_out) == ("output", 256, 4)     # a readout onto the experts
    assert r0.init_std == pytest.approx(math.sqrt(4) / 64)         # muP readout: ~1/width
    assert r.lr / r0.lr == pytest.approx(1 / 4) and r.eps == r0.eps


def test_builtin_moe_runs_on_meta_and_returns_its_losses():
    m = moe_gpt(32, vocab=64, seq_len=16, experts=4, top_k=1, capacity_factor=1.0)
    out = m(torch.randint(0, 64, (2, 16)))
    assert set(out) == {"logits", "aux_loss", "z_loss"} and out["logits"].shape == (2, 16, 64)
    assert 0.9 < float(out["aux_loss"]) < 4.0                      # 1 when balanced, <= experts
    with torch.device("meta"):
        mm = moe_gpt(32, vocab=64, seq_len=16)
    assert mm(torch.randint(0, 64, (2, 16)).to("meta"))["logits"].shape == (2, 16, 64)
    with pytest.raises(UserError, match="top_k"):
        moe_gpt(32, experts=2, top_k=3)


def _data(vocab=64, seq=16, bs=4):
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randint(0, vocab, (bs, seq), generator=g)
        yield x, torch.roll(x, -1, 1)


def test_aux_losses_are_added_and_logged_and_a_missing_one_is_named():
    torch.manual_seed(0)
    m = moe_gpt(32, vocab=64, seq_len=16)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    cfg = TrainConfig(steps=2, log_every=1, aux_losses={"aux_loss": 0.01, "z_loss": 0.001})
    st = train(m, opt, _data(), cfg)
    assert set(st.aux) == {"aux_loss", "z_loss"} and 0.9 < st.aux["aux_loss"] < 4 and st.aux["z_loss"] > 0
    # the objective includes them: the router gets a gradient from aux alone
    m.zero_grad()
    out = m(next(_data())[0])
    out["aux_loss"].backward()
    assert m.blocks[0].moe.router.weight.grad.abs().sum() > 0
    with pytest.raises(UserError, match="train.aux_losses.balance"):
        train(m, opt, _data(), TrainConfig(steps=1, aux_losses={"balance": 1.0}))


def test_a_dense_model_is_unaffected_by_aux_losses_being_empty():
    from mutransfer.models import gpt
    losses = []
    for aux in ({}, {}):
        torch.manual_seed(0)
        m = gpt(32, vocab=64, seq_len=16, layers=1)
        st = train(m, torch.optim.AdamW(m.parameters(), lr=1e-3), _data(), TrainConfig(steps=2, aux_losses=aux))
        losses.append(st.loss)
        assert st.aux == {}
    assert losses[0] == losses[1]


# ----------------------------------------------------------------------------------- engine/experts.py

def test_expert_count_rules_by_hand():
    assert rule.active_fraction(8, 2) == 0.25
    assert rule.gate_size(8, 2) == 0.5 and rule.gate_size(8, 2, normalized=False) == 1 / 8
    assert rule.moe_output_scale(8, 2) == 1.0 and rule.moe_output_scale(8, 2, normalized=False) == 0.25
    assert rule.expert_grad_scale(8, 2) == pytest.approx(1 / 8)       # (k/E)(1/k)
    # 4 -> 32 experts, top-2: Adam keeps init and LR, eps / 8; SGD's LR x 8
    assert rule.ratios((4, 2), (32, 2), spectral.ADAMW) == (1.0, 1.0, pytest.approx(1 / 8))
    assert rule.ratios((4, 2), (32, 2), spectral.SGD) == (1.0, pytest.approx(8.0), 1.0)
    assert rule.ratios((4, 2), (32, 2), spectral.ADAM, kind=rule.ROUTER) == (1.0, 1.0, pytest.approx(1 / 8))
    # top-k at fixed E with normalised gates: the gradient share (k/E)(1/k) does not move
    assert rule.ratios((8, 1), (8, 4), spectral.ADAMW) == (1.0, 1.0, pytest.approx(1.0))
    # the spectral rule read with fan_out = E would grow the router's init like sqrt(E): we depart
    assert rule.spectral_router_init_ratio(256, 4, 16) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        rule.ratios((4, 2), (2, 4), spectral.ADAMW)


# ------------------------------------------------------------------------------- transformers MoE models

transformers = pytest.importorskip("transformers")


def _hf(model_type, **extra):
    """A factory for a tiny transformers MoE of `model_type`: hidden = width, experts' size = width."""
    def factory(width):
        kw = dict(hidden_size=width, num_hidden_layers=1, vocab_size=256, num_attention_heads=width // 16,
                  num_key_value_heads=width // 32, max_position_embeddings=64, tie_word_embeddings=False)
        kw.update({k: (v(width) if callable(v) else v) for k, v in extra.items()})
        cfg = transformers.AutoConfig.for_model(model_type, **kw)
        return transformers.AutoModelForCausalLM.from_config(cfg)
    return factory


ARCHS = {
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=lambda w: 2 * w,
                      moe_intermediate_size=lambda w: w, shared_expert_intermediate_size=lambda w: w),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=lambda w: w),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                        first_k_dense_replace=0, moe_intermediate_size=lambda w: w, intermediate_size=lambda w: 2 * w,
                        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        num_key_value_heads=lambda w: w // 16),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_transformers_moe_experts_planned_per_slice_without_layouts(arch):
    f = _hf(arch, **ARCHS[arch])
    hp = HParams(lr=1e-2, eps=1e-8)
    s0, s = infer_shapes(f, {}, 64, 64, example=TOK, warn=False), infer_shapes(f, {}, 64, 256, example=TOK, warn=False)
    p0, p = make_plan(s0, hp, "adamw"), make_plan(s, hp, "adamw")
    gu = next(n for n in p.params if n.endswith("experts.gate_up_proj"))
    dn = next(n for n in p.params if n.endswith("experts.down_proj"))
    assert (p.params[gu].layout, p.params[gu].role, p.params[gu].fan_in, p.params[gu].fan_out) == \
        ("stacked out_in", "hidden", 256, 512)
    assert (p.params[dn].layout, p.params[dn].fan_in, p.params[dn].fan_out) == ("stacked out_in", 256, 256)
    assert p0.params[gu].init_std == pytest.approx(0.125)          # the 1.2e-4 was the 2-D reading
    assert p0.params[dn].init_std == pytest.approx(0.125)
    for n in (gu, dn):
        assert p.params[n].lr / p0.params[n].lr == pytest.approx(1 / 4)     # not 1/16
        assert p.params[n].eps / p0.params[n].eps == pytest.approx(1 / 4)   # rescaled
    router = next(n for n in p.params if n.endswith("mlp.gate.weight"))
    assert (p.params[router].role, p.params[router].fan_in, p.params[router].fan_out) == ("output", 256, 4)
    assert not [n for n in s.unknown if "experts" in n]


def test_gpt_oss_transposed_experts_and_their_bias_stacks():
    f = _hf("gpt_oss", num_local_experts=4, num_experts_per_tok=2, intermediate_size=lambda w: w,
            head_dim=16, sliding_window=8, layer_types=["full_attention"])
    s = infer_shapes(f, {}, 64, 256, example=TOK, warn=False)
    got = {n.split("experts.")[1]: (p.layout, p.role, p.fan_in, p.fan_out)
           for n, p in s.params.items() if "experts." in n}
    assert got["gate_up_proj"] == ("stacked in_out", "hidden", 256, 512)      # stored (E, in, out)
    assert got["down_proj"] == ("stacked in_out", "hidden", 256, 256)
    assert got["gate_up_proj_bias"] == ("stacked vector", "vector", 1, 512)
    assert got["down_proj_bias"] == ("stacked vector", "vector", 1, 256)


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_every_transformers_experts_implementation_traces_as_a_stack(impl):
    m = _hf("qwen2_moe", **ARCHS["qwen2_moe"])(32)
    m.set_experts_implementation(impl)
    uses = trace_uses(m, TOK)
    for n in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        got = layout_from_use(uses[n], tuple(m.get_parameter(n).shape))
        assert got is not None and got[1] == "stacked out_in", (n, uses[n])


def _cli(tmp_path, recipe, *args):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        return CliRunner().invoke(app, [*args[:1], "r.yaml", *args[1:]])
    finally:
        os.chdir(old)


def _qwen_recipe(experts=4):
    return {"name": "hfmoe", "model": {
        "factory": "hf:qwen2_moe",
        "args": {"num_hidden_layers": 1, "vocab_size": 256, "max_position_embeddings": 32,
                 "tie_word_embeddings": False, "num_experts": experts, "num_experts_per_tok": 2,
                 "norm_topk_prob": True, "output_router_logits": True},
        "width_fields": {"hidden_size": 1, "intermediate_size": 2, "moe_intermediate_size": 1,
                         "shared_expert_intermediate_size": 1},
        "heads_field": "num_attention_heads", "head_dim": 16, "kv_heads_field": "num_key_value_heads",
        "kv_groups": 1},
        "data": {"factory": "builtin:pysource", "args": {"seq_len": 16, "max_bytes": 100000}},
        "widths": {"proxy": 32, "target": 64},
        "train": {"optimizer": "adamw", "lr": 3e-3, "steps": 2, "batch_size": 4, "eval_batches": 1,
                  "aux_losses": {"aux_loss": 0.01}}}


def test_dry_run_of_a_transformers_moe_counts_flops_of_the_top_k(tmp_path):
    flops = {}
    for e in (4, 8):
        res = _cli(tmp_path, _qwen_recipe(e), "scale", "--dry-run", "--json", "plan.json")
        assert res.exit_code == 0, res.output[-2000:]
        d = json.loads((tmp_path / "plan.json").read_text())
        assert d["cost"]["flops_per_step"] and "batched_mm" in d["cost"]["flops_note"]
        flops[e] = d["cost"]["flops_per_step"]
        row = next(r for r in d["params"] if r["name"].endswith("experts.gate_up_proj"))
        assert (row["layout"], row["stack"], row["fan_in"], row["fan_out"]) == ("stacked out_in", [e], 64, 128)
        assert "stacked out_in ×" in res.output and f"{e} experts, top-2" in res.output
    # twice the experts, the same top-2 per token: the same compute (only the router grows)
    assert flops[8] / flops[4] == pytest.approx(1.0, abs=0.02)


def test_scale_trains_a_transformers_moe_with_its_load_balancing_loss(tmp_path):
    res = _cli(tmp_path, _qwen_recipe(), "scale", "--out", "run")
    assert res.exit_code == 0, res.output[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["aux/aux_loss"] > 0.5


# ----------------------------------------------------------------------------------- coordinate check

def _cc_recipe(**extra):
    return {"name": "ccmoe", "model": {"factory": "builtin:moe-gpt", "args": {
        "layers": 1, "head_dim": 16, "vocab": 128, "seq_len": 16, "experts": 4, "top_k": 2}},
        "data": {"factory": "builtin:pysource", "args": {"seq_len": 16, "max_bytes": 100000}},
        "widths": {"proxy": 32, "target": 128},
        "train": {"optimizer": "adamw", "lr": 1e-3, "steps": 10, "batch_size": 4}, **extra}


def test_coord_check_passes_the_builtin_moe_under_mup_and_flags_sp(tmp_path):
    flags = ("--widths", "32,64,128", "--seeds", "1", "--steps", "3")
    res = _cli(tmp_path, _cc_recipe(), "coord-check", *flags)
    assert res.exit_code == 0, res.output[-2000:]
    res = _cli(tmp_path, _cc_recipe(), "coord-check", *flags, "--parametrization", "sp", "--json", "sp.json")
    assert res.exit_code == 1, res.output[-2000:]
    rows = {(m["name"], m["statistic"]): m for m in json.loads((tmp_path / "sp.json").read_text())["modules"]}
    assert rows[("blocks.0.moe.w_in", "‖ΔW‖")]["flag"] == "mis-scaled"


def test_coord_check_flags_experts_read_as_flat_matrices(tmp_path):
    # the planted bug: the experts declared as 2-D (out, in) matrices, fan_in = the product of the
    # trailing dims and fan_out = the expert count (what the tool did before stacks were recognised)
    bug = _cc_recipe(layouts={"*.moe.w_in": "out_in", "*.moe.w_out": "out_in"})
    res = _cli(tmp_path, bug, "coord-check", "--widths", "32,64,128", "--seeds", "1", "--steps", "3",
               "--json", "bug.json")
    assert res.exit_code == 1, res.output[-2000:]
    rows = {(m["name"], m["statistic"]): m for m in json.loads((tmp_path / "bug.json").read_text())["modules"]}
    assert rows[("blocks.0.moe.w_in", "‖W₀‖")]["flag"] == "mis-scaled"


def test_the_experts_rule_module_imports_no_torch():
    import ast

    import mutransfer.engine.experts as mod
    tree = ast.parse(open(mod.__file__).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(x == "torch" or x.startswith("torch.") for x in names), names
