"""Depth transfer: the rule by hand, residual branches found by tracing (built-in gpt and resmlp,
transformers GPT-2 and Llama, a user's block), the proxy depth is the plain model, the multipliers
act as the plan says, and the mistakes a user can make are one line, exit 2."""
import math

import pytest
import torch
import yaml
from torch import nn

from mutransfer.engine import depth as rule
from mutransfer.engine.branches import find_branches
from mutransfer.models import gpt, resmlp
from mutransfer.run import experiment
from mutransfer.run.recipe import parse_recipe

from helpers import cli_in  # tests/ is on sys.path (pytest's rootdir-relative import)


def test_rule_by_hand():
    assert rule.branch_multiplier(2, 8, 1.0) == 0.25
    assert rule.branch_multiplier(2, 8, 0.5) == 0.5
    assert rule.lr_ratio(2, 8, 1.0, "adamw") == 1.0               # CompleteP: Adam LR depth-independent
    assert rule.lr_ratio(2, 8, 0.5, "adam") == pytest.approx(0.5)  # depth-muP: (L/L0)^(-1/2)
    assert rule.lr_ratio(2, 8, 1.0, "sgd") == 4.0                  # SGD: (L/L0)^(2 alpha - 1)
    assert rule.lr_ratio(2, 8, 0.5, "sgd") == 1.0
    assert rule.eps_ratio(2, 8, 1.0) == 0.25 and rule.l2_ratio(4, 16, 0.5) == 0.5
    assert rule.branch_multiplier(3, 3, 0.7) == rule.lr_ratio(3, 3, 0.7, "sgd") == 1.0
    with pytest.raises(ValueError):
        rule.branch_multiplier(0, 4)


class UserBlock(nn.Module):
    """A user's own pre-norm block: a raw-parameter branch and a module branch, added in place."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.gate = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.mix(self.norm(x))
        x += self.gate(x)
        return x


class UserNet(nn.Module):
    def __init__(self, width, depth=3):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.layers = nn.ModuleList(UserBlock(width) for _ in range(depth))
        self.parallel_a, self.parallel_b = nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        h = self.inp(x)
        for blk in self.layers:
            h = blk(h)
        return self.out(self.parallel_a(h) + self.parallel_b(h))     # a parallel sum: no residual


def test_branches_in_builtins_and_a_user_block():
    g = find_branches(gpt(width=32, layers=2, heads=2, vocab=64, seq_len=8), torch.randint(0, 64, (2, 8)))
    assert set(g.modules) == {"blocks.0.attn", "blocks.0.fc_out", "blocks.1.attn", "blocks.1.fc_out"}
    assert g.blocks["blocks.1.attn"] == "blocks.1"
    r = find_branches(resmlp(width=16, in_dim=8, depth=3), torch.randn(2, 8))
    assert set(r.modules) == {f"blocks.{i}.fc_out" for i in range(3)}
    u = find_branches(UserNet(16), torch.randn(2, 8))
    assert set(u.modules) == {f"layers.{i}.{m}" for i in range(3) for m in ("mix", "gate")}


def test_branches_in_transformers_models():
    transformers = pytest.importorskip("transformers")
    g2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                                              n_positions=16))
    b = find_branches(g2, torch.randint(0, 64, (2, 8)))
    assert set(b.modules) == {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn", "mlp")}
    ll = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64, max_position_embeddings=16))
    b = find_branches(ll, torch.randint(0, 64, (2, 8)))
    assert set(b.modules) == {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")}


def recipe(**extra):
    d = {"name": "d", "model": {"factory": "builtin:gpt", "args": {"heads": 2, "vocab": 256, "seq_len": 16}},
         "data": {"factory": "builtin:pysource", "args": {"seq_len": 16}},
         "widths": {"proxy": 32, "target": 64}, "depths": {"proxy": 2, "target": 8},
         "train": {"optimizer": "adamw", "lr": 1e-2, "steps": 4, "batch_size": 4, "eval_batches": 1}}
    d.update(extra)
    return parse_recipe(d)


def test_the_proxy_depth_is_the_plain_model():
    r = recipe()
    with_rule = experiment.build(r, 32)
    plain = parse_recipe({**r.model_dump(mode="json", exclude={"depths"}),
                          "model": {"factory": "builtin:gpt", "args": {"heads": 2, "vocab": 256, "seq_len": 16,
                                                                        "layers": 2}}})
    without = experiment.build(plain, 32)
    assert with_rule.plan.branch_multipliers == {}
    assert [(g["lr"], g.get("eps"), g["weight_decay"]) for g in with_rule.optimizer.param_groups] == \
           [(g["lr"], g.get("eps"), g["weight_decay"]) for g in without.optimizer.param_groups]
    for (n, a), (_, b) in zip(with_rule.model.named_parameters(), without.model.named_parameters()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(with_rule.model(x), without.model(x))


@pytest.mark.parametrize("optimizer,alpha", [("adamw", 1.0), ("sgd", 1.0), ("adam", 0.5)])
def test_deep_plan_and_multipliers(optimizer, alpha):
    r = recipe(depths={"proxy": 2, "target": 8, "alpha": alpha},
               train={"optimizer": optimizer, "lr": 1e-2, "steps": 4, "batch_size": 4, "weight_decay": 0.1})
    base = experiment.build(r, 32).plan
    deep = experiment.build(experiment.at_depth(r, 8), 32)
    m = (2 / 8) ** alpha
    assert {k: v[0] for k, v in deep.plan.branch_multipliers.items()} == {
        f"blocks.{i}.{b}": pytest.approx(m) for i in range(8) for b in ("attn", "fc_out")}
    p0, p = base.params["blocks.1.fc.weight"], deep.plan.params["blocks.5.fc.weight"]
    assert p.lr / p0.lr == pytest.approx(rule.lr_ratio(2, 8, alpha, optimizer))
    if optimizer != "sgd":
        assert p.eps / p0.eps == pytest.approx(m)
    assert deep.plan.params["head.weight"].lr == base.params["head.weight"].lr        # outside blocks: unchanged
    assert deep.plan.params["blocks.5.ln1.weight"].depth_lr is not None                 # the block's norms too
    # the multiplier is applied to the branch output in the forward pass
    seen = {}
    attn = deep.model.blocks[3].attn
    h = attn.register_forward_hook(lambda mod, a, out: seen.setdefault("out", out))
    x = torch.randint(0, 256, (2, 16))
    deep.model(x)
    h.remove()
    inner = {}
    h2 = attn.proj.register_forward_hook(lambda mod, a, out: inner.setdefault("out", out))
    deep.model(x)
    h2.remove()
    assert torch.allclose(seen["out"], inner["out"] * m)           # (the multiplier's hook runs first)


cli = cli_in

def write(tmp, d):
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


BASE = {"name": "dd", "model": {"factory": "builtin:gpt", "args": {"heads": 2, "vocab": 256, "seq_len": 16}},
        "data": {"factory": "builtin:pysource", "args": {"seq_len": 16}},
        "widths": {"proxy": 16, "target": 32}, "depths": {"proxy": 1, "target": 2},
        "train": {"optimizer": "adamw", "lr": 1e-2, "steps": 4, "batch_size": 4, "eval_batches": 1},
        "search": {"trials": 2, "params": {"lr": {"low": 1e-3, "high": 3e-2, "log": True}}}}


def test_tune_then_scale_across_width_and_depth(tmp_path):
    r = write(tmp_path, BASE)
    assert cli(tmp_path, "tune", r).exit_code == 0
    hp = yaml.safe_load((tmp_path / "runs" / "dd" / "hparams.yaml").read_text())
    assert hp["proxy_depth"] == 1 and hp["proxy_width"] == 16
    res = cli(tmp_path, "scale", r, "--depth", "3")
    assert res.exit_code == 0, res.output
    used = yaml.safe_load((tmp_path / "runs" / "dd" / "scale-32-d3" / "hparams.yaml").read_text())
    assert (used["proxy_depth"], used["depth"], used["width"]) == (1, 3, 32)
    res = cli(tmp_path, "scale", r, "--dry-run", "--depth", "4")
    assert res.exit_code == 0 and "depth rule" in res.output and "output x 0.25" in res.output


@pytest.mark.parametrize("change,needle", [
    (lambda d: d["model"]["args"].update(layers=2), "model.args.layers and depths"),
    (lambda d: d.update(model={"factory": "builtin:mlp", "args": {"in_dim": 8}},
                        data={"factory": "builtin:vectors", "args": {"dim": 8}}), "no residual branch"),
    (lambda d: d.update(residual_branches=["nothing.*"]), "residual_branches: nothing.*"),
    (lambda d: d.update(depths={"proxy": 4, "target": 2}), "proxy depth (4) is above target depth (2)"),
])
def test_depth_mistakes_are_one_line_exit_2(tmp_path, change, needle):
    d = yaml.safe_load(yaml.safe_dump(BASE))
    change(d)
    res = cli(tmp_path, "tune", write(tmp_path, d))
    assert res.exit_code == 2 and needle in res.output and "\n" not in res.output.strip(), res.output
    assert not (tmp_path / "runs").exists()


def test_sweep_over_depths_reports_both_arms(tmp_path):
    r = write(tmp_path, BASE)
    res = cli(tmp_path, "sweep", r, "--depths", "1,2", "--lrs", "0.003,0.01", "--steps", "3", "--json", "d.json")
    assert res.exit_code == 3, res.output              # one seed: the transfer verdict is inconclusive (exit 3)
    import json
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["axis"] == "depth" and set(d["drift_octaves"]) == {"mup", "sp"} and "deeper_is_better" in d
    assert set(d["results"]["mup"]) == {"1", "2"}
    res = cli(tmp_path, "sweep", r, "--depths", "1,2", "--widths", "16,32")
    assert res.exit_code == 2 and "--depths" in res.output
    assert math.isfinite(d["results"]["mup"]["2"]["losses"][0])


def test_coord_check_over_depths_passes_the_rule_and_flags_no_rule(tmp_path):
    d = yaml.safe_load(yaml.safe_dump(BASE))
    d["widths"] = {"proxy": 32, "target": 64}
    d["train"]["batch_size"] = 8
    r = write(tmp_path, d)
    res = cli(tmp_path, "coord-check", r, "--depths", "1,2,4,8", "--seeds", "1", "--json", "c.json")
    assert res.exit_code == 0, res.output[-2000:]
    import json
    names = {m["name"] for m in json.loads((tmp_path / "c.json").read_text())["modules"]}
    assert "blocks.0" in names and "blocks.3" not in names            # compared at the same relative depth
    res = cli(tmp_path, "coord-check", r, "--depths", "1,2,4,8", "--seeds", "1", "--parametrization", "sp")
    assert res.exit_code == 1, res.output[-2000:]
