"""The coordinate check on models nobody here wrote, at its defaults (only --widths): attention seen
inside transformers' GPT-2 (SDPA and eager) and named when its scale is 1/sqrt(d_head) with d_head
growing; a mis-scaled position table caught by the spectral check; no false alarm on correct CNNs
whose growth is transient or whose stem crosses the rule's regime; the Python API."""
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import mutransfer
from mutransfer.cli import app
from mutransfer.models import gpt
from mutransfer.run import coord
from mutransfer.run.recipe import parse_recipe

sys.path.insert(0, str(Path(__file__).parent))
import real_models  # noqa: E402,F401  (factories by name)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WIDTHS = "64,128,256,512"


def _cli(tmp_path, recipe: dict, *flags):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        return CliRunner().invoke(app, ["coord-check", str(p), *flags])
    finally:
        os.chdir(old)


def _hf_gpt2_recipe(fixed_heads: bool, attn: str):
    d = yaml.safe_load((ROOT / "recipes" / "hf-gpt2.yaml").read_text())
    d["model"]["attn_implementation"] = attn
    d["data"]["args"]["seq_len"] = 32
    d["model"]["args"]["n_positions"] = 32
    d["train"]["batch_size"] = 8
    if fixed_heads:
        del d["model"]["heads_field"], d["model"]["head_dim"]
        d["model"]["args"]["n_head"] = 2
    return d


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_defaults_flag_fixed_head_sqrt_attention_in_hf_gpt2(tmp_path, attn):
    pytest.importorskip("transformers")
    res = _cli(tmp_path, _hf_gpt2_recipe(True, attn), "--widths", DEFAULT_WIDTHS, "--seeds", "1",
               "--json", "cc.json")
    assert res.exit_code == 1, res.output[-1500:]
    assert "transformer.h.0.attn: scale 1/√d_head with d_head ∝ width" in res.output
    import json
    data = json.loads((tmp_path / "cc.json").read_text())
    assert any(m["name"] == "transformer.h.0.attn:attn-logits" for m in data["modules"])   # logits measured
    # heads growing (d_head fixed at 16): the same model passes
    res = _cli(tmp_path, _hf_gpt2_recipe(False, attn), "--widths", DEFAULT_WIDTHS, "--seeds", "1")
    assert res.exit_code == 0, res.output[-1500:]


def _recipe(model, args, data, lr=1e-3, bs=8, **extra):
    return {"name": "cc", "model": {"factory": model, "args": args}, "data": data,
            "widths": {"proxy": 64, "target": 512},
            "train": {"optimizer": "adamw", "lr": lr, "steps": 100, "batch_size": bs}, **extra}


SEQ = {"factory": "builtin:pysource", "args": {"seq_len": 32}}


def test_defaults_flag_the_builtin_test_model_and_pass_the_builtin_gpt(tmp_path):
    res = _cli(tmp_path, _recipe("coord_models:attn_sqrt_dhead", {"heads": 1}, SEQ), "--widths", DEFAULT_WIDTHS)
    assert res.exit_code == 1 and "attn: scale 1/√d_head" in res.output
    # the built-in gpt with a fixed head count uses SDPA with scale attn_mult/d_head: no finding
    res = _cli(tmp_path, _recipe("builtin:gpt", {"layers": 1, "heads": 2, "vocab": 256, "seq_len": 32}, SEQ),
               "--widths", DEFAULT_WIDTHS, "--seeds", "1")
    assert res.exit_code == 0 and "d_head" not in res.output, res.output[-1500:]


def test_spectral_check_catches_a_position_table_given_the_output_rule(tmp_path):
    img = {"factory": "builtin:images", "args": {"size": 8}}
    wrong = _recipe("real_models:tiny_vit", {}, img, bs=16, layouts={"pos_embed": "out_in"})
    res = _cli(tmp_path, wrong, "--widths", DEFAULT_WIDTHS, "--seeds", "1", "--json", "w.json")
    assert res.exit_code == 1, res.output[-1500:]
    import json
    rows = {(m["name"], m["statistic"]): m for m in json.loads((tmp_path / "w.json").read_text())["modules"]}
    assert rows[("pos_embed", "‖W₀‖")]["flag"] == "mis-scaled"
    right = _recipe("real_models:tiny_vit", {}, img, bs=16)
    res = _cli(tmp_path, right, "--widths", DEFAULT_WIDTHS, "--seeds", "1")
    assert res.exit_code == 0, res.output[-1500:]


def test_small_cnn_and_a_stem_crossing_the_rules_regime_pass(tmp_path):
    img = {"factory": "builtin:images", "args": {"size": 8}}
    # channels 8 -> 64 (the stem's fan_in is 3 x 9 = 27: it crosses min(1, sqrt(fan_out/fan_in)) at 32)
    r = _recipe("builtin:cnn", {"in_channels": 3, "classes": 10, "blocks": 1}, img, bs=16)
    res = _cli(tmp_path, r, "--widths", "8,16,32,64", "--json", "c.json")
    assert res.exit_code == 0, res.output[-2000:]
    import json
    notes = json.loads((tmp_path / "c.json").read_text())["notes"]
    assert any(n.startswith("stem.weight: the rule's min(1, √(fan_out/fan_in)) changes branch between widths 16 and 32")
               for n in notes), notes


def test_transient_growth_is_not_a_blowup_but_a_trend_is():
    ws = [8, 16, 32, 64]
    assert coord.judged(ws, [0.070, 0.115, 0.182, 0.167], "act")[2] == "ok"       # stops at the widest
    assert coord.judged(ws, [0.07, 0.1, 0.14, 0.2], "act")[2] == "blowup"          # keeps growing
    slope, tail, f = coord.judged(ws, [1.0, 1.0, 4.0, 8.0], "‖W₀‖")
    assert f == "mis-scaled" and coord.judged(ws, [1.0, 0.5, 0.25, 0.125], "‖W₀‖")[2] == "mis-scaled"
    assert coord.judged(ws, [1.0, 2.0, 4.0, 8.0], "‖ΔW·x‖")[2] == "mis-scaled"
    assert coord.judged(ws, [1.0, 0.5, 0.25, 0.125], "‖ΔW‖")[2] == "vanishing"    # a shrinking update: a warning


# ------------------------------------------------------------------------------------- Python API

def _batches(n=5, seed=0):
    from mutransfer.data import pysource
    it = pysource(batch_size=8, seed=seed, seq_len=32)
    return [next(it) for _ in range(n)]


def test_python_api_matches_the_cli_on_a_builtin_recipe(tmp_path):
    args = {"layers": 1, "heads": 2, "vocab": 256, "seq_len": 32}
    api = mutransfer.coord_check(gpt, [32, 64, 128], batches=_batches(), steps=3, lr=1e-2, args=args)
    rec = parse_recipe(_recipe("builtin:gpt", args, SEQ, lr=1e-2))
    cli = coord.run(rec, coord.resolve(rec, widths=[32, 64, 128], steps=3, seeds=1))
    assert api.verdict == cli.verdict == "ok"
    assert {(r.name, r.statistic) for r in api.rows} == {(r.name, r.statistic) for r in cli.rows}
    assert api.to_json()["verdict"] == "ok"
    # the same API flags a defect
    sys.path.insert(0, str(Path(__file__).parent))
    import coord_models
    bad = mutransfer.coord_check(coord_models.attn_sqrt_dhead, [32, 64, 128], batches=_batches(), steps=3, lr=1e-2)
    assert bad.verdict == "blowup" and bad.findings


def test_python_api_runs_a_user_loop():
    calls = []

    def step(model, opt, batch):
        x, y = batch
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        calls.append(float(loss))

    kw = dict(batches=_batches(), steps=2, lr=1e-2, args={"layers": 1, "heads": 2, "vocab": 256, "seq_len": 32})
    res = mutransfer.coord_check(gpt, [32, 64, 128], train_step=step, **kw)
    assert len(calls) == 6
    ours = mutransfer.coord_check(gpt, [32, 64, 128], **kw)      # mutransfer's loop: the same training
    a = {(r.name, r.statistic): r for r in res.rows}
    b = {(r.name, r.statistic): r for r in ours.rows}
    assert a.keys() == b.keys() and any(k[1] == "‖ΔW·x‖" for k in a)     # updates judged in feature space
    for k in a:
        assert a[k].values == pytest.approx(b[k].values, rel=1e-3, abs=1e-6), k
    assert res.verdict == ours.verdict
