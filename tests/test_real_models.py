"""Models nobody here wrote: layouts decided from use (raw parameters, a ViT-style token model,
Hugging Face GPT-2 / Llama / ViT built from configs), tied LMs whose logits stay O(1) with width,
model.output, the factory's own init, and the hf: recipes end to end."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mutransfer.engine.hparams import HParams
from mutransfer.engine.parametrize import parametrize
from mutransfer.engine.shapes import infer_shapes
from mutransfer.models import gpt
from mutransfer.run import coord, experiment
from mutransfer.run.recipe import parse_recipe

from helpers import cli_in  # tests/ is on sys.path (pytest's rootdir-relative import)

sys.path.insert(0, str(Path(__file__).parent))   # real_models, for "real_models:NAME" factories
import real_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


def roles(s):
    return {n: (p.role, p.fan_in, p.fan_out) for n, p in s.params.items()}


# --------------------------------------------------------------------------------- traced layouts

def test_raw_xw_parameters_are_traced():
    s = infer_shapes(real_models.xw, {}, 16, 64, example=torch.randn(2, 8))
    r = roles(s)
    assert r["w_in"] == ("input", 8, 64)            # (in, out) used as x @ W
    assert r["w_hid"] == ("hidden", 64, 64)
    assert r["w_out"] == ("output", 64, 10)          # (out, in) through F.linear
    assert r["b_in"] == ("vector", 1, 64) and r["gain"] == ("vector", 1, 64)
    assert all(p.source == "traced" for p in s.params.values()) and s.unknown == []
    assert s.params["w_in"].layout == "in_out" and s.params["w_out"].layout == "out_in"


def test_vit_tokens_are_one_hot_inputs():
    s = infer_shapes(real_models.tiny_vit, {}, 16, 64, example=torch.randn(2, 3, 8, 8))
    r = roles(s)
    assert r["cls_token"] == ("input", 1, 64) and r["pos_embed"] == ("input", 1, 64)
    assert s.params["cls_token"].source == "traced"
    assert r["patch.weight"] == ("input", 3 * 16, 64)
    assert r["head.weight"] == ("output", 64, 10)


def test_without_an_example_raw_parameters_are_guessed_and_named():
    with pytest.warns(UserWarning, match="no example input"):
        s = infer_shapes(real_models.xw, {}, 16, 64)
    assert set(s.unknown) == {"w_in", "b_in", "w_hid", "gain", "w_out"}


def _hf_gpt2(width, heads=None, vocab=256, **kw):
    cfg = transformers.GPT2Config(n_embd=width, n_layer=2, n_head=heads or width // 16, vocab_size=vocab,
                                  n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def test_hf_gpt2_conv1d_is_read_as_x_times_w():
    s = infer_shapes(_hf_gpt2, {}, 32, 128, example=torch.randint(0, 256, (2, 16)))
    r = roles(s)
    assert r["transformer.h.0.attn.c_attn.weight"] == ("hidden", 128, 384)
    assert r["transformer.h.0.attn.c_proj.weight"] == ("hidden", 128, 128)
    assert r["transformer.h.0.mlp.c_fc.weight"] == ("hidden", 128, 512)
    assert r["transformer.h.0.mlp.c_proj.weight"] == ("hidden", 512, 128)
    assert r["transformer.h.0.mlp.c_fc.bias"] == ("vector", 1, 512)
    assert r["transformer.wte.weight"] == ("input", 1, 128) and r["transformer.wpe.weight"] == ("input", 1, 128)
    assert s.tied_readouts == {"lm_head": "transformer.wte.weight"}
    assert s.params["transformer.h.0.attn.c_attn.weight"].source == "traced"


def _hf_llama(width):
    cfg = transformers.LlamaConfig(hidden_size=width, intermediate_size=8 * width // 3 // 8 * 8, num_hidden_layers=1,
                                   num_attention_heads=width // 16, num_key_value_heads=width // 32,
                                   vocab_size=256, max_position_embeddings=32, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def test_hf_llama_gqa_swiglu_rmsnorm():
    s = infer_shapes(_hf_llama, {}, 64, 256, example=torch.randint(0, 256, (2, 16)))
    r = roles(s)
    inter = 8 * 256 // 3 // 8 * 8
    assert r["model.layers.0.self_attn.k_proj.weight"] == ("hidden", 256, 128)     # GQA: 8 kv heads of 16
    assert r["model.layers.0.mlp.gate_proj.weight"] == ("hidden", 256, inter)
    assert r["model.layers.0.mlp.down_proj.weight"] == ("hidden", inter, 256)
    assert r["model.layers.0.input_layernorm.weight"] == ("vector", 1, 256)         # RMSNorm gain, traced
    assert s.params["model.norm.weight"].source == "traced"
    assert r["lm_head.weight"] == ("output", 256, 256) and r["model.embed_tokens.weight"] == ("input", 1, 256)


def _hf_vit(width):
    cfg = transformers.ViTConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                 num_attention_heads=width // 16, image_size=16, patch_size=4, num_labels=10)
    return transformers.ViTForImageClassification(cfg)


def test_hf_vit_cls_and_position_table():
    s = infer_shapes(_hf_vit, {}, 32, 128, example=torch.randn(2, 3, 16, 16))
    r = roles(s)
    assert r["vit.embeddings.cls_token"] == ("input", 1, 128)
    assert r["vit.embeddings.position_embeddings"] == ("input", 1, 128)
    assert r["vit.embeddings.patch_embeddings.projection.weight"] == ("input", 48, 128)


def test_layout_override_contradicting_the_trace_warns_and_is_followed():
    with pytest.warns(UserWarning, match=r"w_in declared 'out_in' but the traced forward pass uses it as 'in_out'"):
        s = infer_shapes(real_models.xw, {}, 16, 64, layouts={"w_in": "out_in"}, example=torch.randn(2, 8))
    assert s.params["w_in"].source == "declared" and s.params["w_in"].fan_in == 64
    with pytest.warns(UserWarning, match=r"head.weight declared 'embedding' but its Linear module"):
        infer_shapes(real_models.tiny_vit, {}, 16, 64, layouts={"head.weight": "embedding"},
                     example=torch.randn(2, 3, 8, 8))


# ------------------------------------------------------------------------------------ tied LMs

def _init_logits(factory, args, width, base, idx):
    hp = HParams(lr=1e-3)
    model, _, plan = parametrize(factory, width=width, base_width=base, hparams=hp, args=args,
                                 example=idx, seed=0)
    model.eval()
    with torch.no_grad():
        out = model(idx)
        logits = out.logits if hasattr(out, "logits") else out
    cur = logits.gather(-1, idx[..., None]).squeeze(-1)        # the current token's own logit
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    return float(cur.mean()), float(loss)


@pytest.mark.parametrize("which", ["builtin", "hf-gpt2"])
def test_tied_lm_logits_flat_in_width(which):
    """vocab 256 over widths 64 -> 512: the current-token logit and the initial loss within 2x."""
    idx = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    if which == "builtin":
        f, args = gpt, dict(layers=2, heads=4, vocab=256, seq_len=16, tied=True)
    else:
        f, args = (lambda width: _hf_gpt2(width)), {}
    cur, loss = zip(*(_init_logits(f, args, w, 64, idx) for w in (64, 128, 256, 512)))
    assert max(abs(c) for c in cur) <= 2 * max(min(abs(c) for c in cur), 0.5), cur
    assert max(loss) / min(loss) < 2.0 and max(loss) < 2 * math.log(256), loss


def _cc_recipe(model, args, data=None, lr=3e-3, **extra):
    return parse_recipe({
        "name": "cc", "model": {"factory": model, "args": args, **extra},
        "data": data or {"factory": "builtin:pysource", "args": {"seq_len": 32}},
        "widths": {"proxy": 64, "target": 512},
        "train": {"optimizer": "adamw", "lr": lr, "steps": 100, "batch_size": 8},
    })


@pytest.mark.parametrize("vocab", [32, 256])
def test_tied_builtin_passes_coord_check_under_mup_and_is_flagged_under_sp(vocab):
    data = {"factory": "real_models:small_vocab_bytes", "args": {"seq_len": 32, "vocab": vocab}}
    r = _cc_recipe("builtin:gpt", dict(layers=2, heads=4, vocab=vocab, seq_len=32, tied=True), data=data)
    ok = coord.run(r, coord.resolve(r, widths=[64, 128, 256, 512], seeds=2))
    assert ok.verdict == "ok", [(x.name, x.statistic, x.slope) for x in ok.worst_first[:3]]
    sp = coord.run(r, coord.resolve(r, widths=[64, 128, 256, 512], seeds=2, parametrization="sp"))
    assert sp.verdict == "blowup"


# --------------------------------------------------------------------------------- model.output

def _write(tmp_path, name, model, args, data=None, **model_extra):
    rec = {
        "name": name, "model": {"factory": model, "args": args, **model_extra},
        "data": data or {"factory": "builtin:pysource", "args": {"seq_len": 16}},
        "widths": {"proxy": 16, "target": 32},
        "train": {"optimizer": "adamw", "lr": 3e-3, "steps": 6, "batch_size": 4, "eval_batches": 1},
        "search": {"trials": 2, "params": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(rec))
    return p


_cli = cli_in

def _files(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.parametrize("model,output", [("real_models:nanogpt", 0), ("real_models:dict_out", None)])
def test_tuple_and_model_output_models_run_every_command(tmp_path, model, output):
    extra = {"output": output} if output is not None else {}
    r = _write(tmp_path, "out", model, {"vocab": 256}, **extra)
    for cmd in (["tune", r, "--trials", "2"], ["scale", r, "--steps", "4"],
                ["coord-check", r, "--widths", "16,32", "--steps", "2", "--seeds", "1"]):
        res = _cli(tmp_path, *cmd)
        assert res.exit_code == 0, (cmd, res.output[-800:])
    assert (tmp_path / "runs" / "out" / "scale-32" / "summary.json").is_file()


@pytest.mark.parametrize("model,args,output,match", [
    ("real_models:nanogpt", {}, None, "set model.output"),                    # a tuple without output
    ("real_models:nanogpt", {"full": False}, 0, r"selects a prediction of shape \(\d+, 1, 256\) that does not match targets of shape \(\d+, 16\)"),
    ("real_models:unusable", {}, None, "model returned a dict"),
    ("real_models:dict_out", {}, "hidden", "'hidden' does not select a tensor"),
    ("real_models:nanogpt", {}, 5, "5 does not select a tensor"),
])
def test_unusable_outputs_are_one_line_exit_2_nothing_written(tmp_path, model, args, output, match):
    extra = {"output": output} if output is not None else {}
    r = _write(tmp_path, "bad", model, args, **extra)
    before = _files(tmp_path)
    for cmd in (["tune", r, "--trials", "1"], ["scale", r, "--steps", "2"],
                ["coord-check", r, "--widths", "16,32", "--steps", "1", "--seeds", "1"]):
        res = _cli(tmp_path, *cmd)
        assert res.exit_code == 2, (cmd, res.output)
        line = res.output.strip()
        assert "\n" not in line and "model.output" in line, line
        import re
        assert re.search(match, line), line
        assert _files(tmp_path) == before


def test_unmatched_layout_glob_and_unknown_layout_are_exit_2(tmp_path):
    r = _write(tmp_path, "lay", "real_models:xw", {}, data={"factory": "builtin:vectors", "args": {"dim": 8}})
    d = yaml.safe_load(r.read_text())
    d["layouts"] = {"nothing.*": "in_out"}
    r.write_text(yaml.safe_dump(d))
    res = _cli(tmp_path, "scale", r, "--dry-run")
    assert res.exit_code == 2 and "layouts.nothing.*" in res.output and "matches no parameter" in res.output
    d["layouts"] = {"w_in": "sideways"}
    r.write_text(yaml.safe_dump(d))
    res = _cli(tmp_path, "scale", r, "--dry-run")
    assert res.exit_code == 2 and "layouts.w_in" in res.output and "sideways" not in res.output.split(":")[0]
    d["layouts"] = {}
    d["factory_init"] = ["nope*"]
    r.write_text(yaml.safe_dump(d))
    res = _cli(tmp_path, "scale", r, "--dry-run")
    assert res.exit_code == 2 and "factory_init" in res.output
    assert _files(tmp_path) == ["lay.yaml"]


def test_bad_output_key_in_recipe_is_exit_2(tmp_path):
    r = _write(tmp_path, "o", "real_models:nanogpt", {}, output=[0])
    res = _cli(tmp_path, "scale", r, "--dry-run")
    assert res.exit_code == 2 and "model.output" in res.output


# ---------------------------------------------------------------------------------- factory init

def test_factory_init_is_transferred_by_the_rules_ratio():
    f = lambda width: _hf_gpt2(width)  # noqa: E731
    idx = torch.randint(0, 256, (2, 8))
    name = "transformer.h.0.mlp.c_proj.weight"            # GPT-2: std 0.02 / sqrt(2 * n_layer)
    stds = {}
    for w in (32, 128):
        model, _, plan = parametrize(f, width=w, base_width=32, example=idx, factory_init=["*c_proj.weight"])
        assert plan.params[name].init == "factory"
        stds[w] = float(model.get_parameter(name).std())
        assert plan.params["transformer.h.0.mlp.c_fc.weight"].init == "normal"
    assert stds[32] == pytest.approx(0.01, rel=0.1)       # the factory's own value at the proxy
    # hidden (fan_in 4w, fan_out w): the rule's init ratio is sqrt(fan_in ratio)^-1 ... = 1/2 at 4x
    assert stds[128] / stds[32] == pytest.approx(0.5, rel=0.1)


# --------------------------------------------------------------------------------- hf: recipes

@pytest.mark.parametrize("recipe", ["hf-gpt2", "hf-llama"])
def test_hf_recipes_tune_then_scale(tmp_path, recipe):
    d = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())
    d["train"].update(steps=8, batch_size=4, eval_batches=1)
    d["widths"] = {"proxy": 32, "target": 64}
    d["search"]["trials"] = 2
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(d))
    res = _cli(tmp_path, "tune", r)
    assert res.exit_code == 0, res.output[-1500:]
    hp = yaml.safe_load((tmp_path / "runs" / recipe / "hparams.yaml").read_text())
    assert hp["proxy_width"] == 32
    res = _cli(tmp_path, "scale", r)
    assert res.exit_code == 0, res.output[-1500:]
    summary = json.loads((tmp_path / "runs" / recipe / "scale-64" / "summary.json").read_text())
    assert math.isfinite(summary["train_loss"])


def test_hf_factory_mistakes_are_named(tmp_path):
    d = yaml.safe_load((ROOT / "recipes" / "hf-gpt2.yaml").read_text())
    d["model"]["width_fields"] = {"n_embed_typo": 1}
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(d))
    res = _cli(tmp_path, "scale", r, "--dry-run")
    assert res.exit_code == 2 and "model.width_fields.n_embed_typo" in res.output
    d["model"]["factory"] = "hf:no-such-model"
    r.write_text(yaml.safe_dump(d))
    res = _cli(tmp_path, "scale", r, "--dry-run")
    assert res.exit_code == 2 and "no-such-model" in res.output


def test_hf_width_fields_round():
    from mutransfer.models.hf import width_value
    assert width_value(8 / 3, 64, 8) == 168 and width_value(8 / 3, 96, 8) == 256 and width_value(0.01, 64, 8) == 8


def test_builtin_byte_batches_are_contiguous():
    x, y = next(iter(experiment.BUILTIN_DATA["pysource"](batch_size=2, seed=0)))
    assert x.is_contiguous() and y.is_contiguous()
    y.view(-1)


class ZeroCentredGain(torch.nn.Module):
    """Gemma's RMSNorm gain: stored zero-centred, used as x * (1 + w)."""

    def __init__(self, width):
        super().__init__()
        self.inp = torch.nn.Linear(8, width)
        self.g = torch.nn.Parameter(torch.zeros(width))
        self.out = torch.nn.Linear(width, 4)

    def forward(self, x):
        return self.out(self.inp(x) * (1.0 + self.g.float()))


def test_zero_centred_gain_is_traced_and_keeps_its_zeros():
    s = infer_shapes(lambda width: ZeroCentredGain(width), {}, 16, 64, example=torch.randn(2, 8))
    assert (s.params["g"].layout, s.params["g"].source, s.params["g"].role) == ("vector", "traced", "vector")
    model, _, plan = parametrize(lambda width: ZeroCentredGain(width), width=64, base_width=16,
                                 example=torch.randn(2, 8))
    assert plan.params["g"].init == "keep" and torch.count_nonzero(model.g) == 0
