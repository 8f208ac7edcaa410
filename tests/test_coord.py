"""coord-check: the pure verdict rules, the probe, the built-in recipes (muP passes, SP is flagged),
width-dependent defects flagged with the settings of docs/coord-check.md while correct unusual models pass, and
the command's exit codes and files."""
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from mutransfer.cli import app
from mutransfer.errors import UserError
from mutransfer.report.coord_report import to_json
from mutransfer.run import coord, coord_measure
from mutransfer.run.recipe import load_recipe, parse_recipe
from mutransfer.run.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))   # coord_models, for "coord_models:NAME" factories

# The recommended settings (docs/coord-check.md, "Choosing --steps and --lr") for a check that must catch defects which only show once the
# features have moved: a 4-width doubling ladder from 64, 10 steps, 10x the recipe's tuned LR, 2 seeds.
WIDTHS, STEPS, SEEDS, LR_FACTOR = [64, 128, 256, 512], 10, 2, 10.0

VEC = {"factory": "builtin:vectors", "args": {"dim": 32, "classes": 10}}
VEC8 = {"factory": "builtin:vectors", "args": {"dim": 32, "classes": 8}}
SEQ = {"factory": "builtin:pysource", "args": {"seq_len": 32}}
IMG = {"factory": "builtin:images", "args": {"size": 4}}


def _recipe(model: str, data: dict, lr: float, batch_size: int = 16, coord_check=None):
    return parse_recipe({
        "name": "cc", "model": {"factory": model, "args": {}}, "data": data,
        "widths": {"proxy": 64, "target": 512},
        "train": {"optimizer": "adamw", "lr": lr, "steps": 100, "batch_size": batch_size},
        "coord_check": coord_check or {},
    })


def _check(recipe, **kw):
    s = coord.resolve(recipe, **kw)
    return coord.run(recipe, s)


def _recommended(recipe):
    return _check(recipe, widths=WIDTHS, steps=STEPS, seeds=SEEDS, lr=LR_FACTOR * recipe.train.lr)


# ------------------------------------------------------------------------------------- pure rules

def test_loglog_slope_recovers_power_laws():
    ws = [64, 128, 256, 512]
    for p in (-1.0, -0.5, 0.0, 0.5, 1.0):
        assert coord.loglog_slope(ws, [3.0 * w**p for w in ws]) == pytest.approx(p)
    assert coord.loglog_slope(ws, [0.0] * 4) == 0.0            # nothing to scale
    assert coord.loglog_slope(ws, [1.0, 2.0, math.nan, 4.0]) == math.inf
    assert coord.loglog_slope(ws, [1.0, 0.0, 1.0, 1.0]) == -math.inf


def test_flags_follow_thresholds():
    assert coord.flag("act", coord.BLOWUP_SLOPE + 0.01) == "blowup"
    assert coord.flag("update", coord.BLOWUP_SLOPE + 0.01) == "blowup"
    assert coord.flag("act", coord.BLOWUP_SLOPE - 0.01) == "ok"
    assert coord.flag("update", coord.VANISH_SLOPE - 0.01) == "vanishing"
    assert coord.flag("act", -1.0) == "ok"                     # shrinking activations are not flagged


def test_default_widths_and_settings_precedence():
    assert coord.default_widths(128) == [64, 128, 256, 512]
    assert coord.default_widths(3) == [3, 6, 12, 24]
    r = _recipe("builtin:mlp", VEC, 1e-3, coord_check=dict(widths=[16, 32], steps=4, seeds=2, lr=0.5, batch_size=8))
    s = coord.resolve(r)
    assert (s.widths, s.steps, s.seeds, s.lr, s.batch_size, s.optimizer) == ((16, 32), 4, 2, 0.5, 8, "adamw")
    s = coord.resolve(r, widths=[64, 8, 8], steps=1, seeds=1, lr=0.1, optimizer="sgd", parametrization="sp")
    assert (s.widths, s.steps, s.lr, s.optimizer, s.parametrization) == ((8, 64), 1, 0.1, "sgd", "sp")
    s = coord.resolve(_recipe("builtin:mlp", VEC, 1e-3))
    assert (s.widths, s.steps, s.seeds, s.lr, s.batch_size) == ((32, 64, 128, 256), 5, 3, 1e-3, 16)
    with pytest.raises(UserError, match="--widths"):
        coord.parse_widths("64,x")
    with pytest.raises(UserError, match="at least 2"):
        coord.parse_widths("64,64")
    with pytest.raises(UserError, match="--optimizer"):
        coord.resolve(r, optimizer="lion")


# ------------------------------------------------------------------------------------------ probe

def test_probe_measures_mean_abs_and_change_on_every_module():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.5, 0.5]]))
    model = nn.Sequential(lin, nn.Identity())
    x = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -2.0]])
    probe = coord.Probe(model, x)
    first = probe()
    y0 = x @ lin.weight.T
    assert set(first) == {"0", "1", coord.ROOT}
    for name in first:
        assert first[name][0] == pytest.approx(float(y0.abs().mean()))
        assert first[name][1] == 0.0
    with torch.no_grad():
        lin.weight.add_(1.0)
    second = probe()
    y1 = x @ lin.weight.T
    assert second["1"][0] == pytest.approx(float(y1.abs().mean()))
    assert second["1"][1] == pytest.approx(float((y1 - y0).abs().mean()))
    assert not lin._forward_hooks                              # hooks exist only while probing


def test_probe_keeps_x0_through_in_place_ops():
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin, nn.ReLU(inplace=True), nn.Identity())
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    probe = coord.Probe(model, x)
    with torch.no_grad():
        y0 = lin(x)
    first = probe()
    assert first["0"][0] == pytest.approx(float(y0.abs().mean()))        # before the in-place ReLU
    assert first["1"][0] == pytest.approx(float(y0.relu().abs().mean()))
    with torch.no_grad():
        lin.bias.sub_(0.5)
        y1 = lin(x)
    second = probe()
    assert second["0"][1] == pytest.approx(float((y1 - y0).abs().mean()))
    assert second["2"][1] == pytest.approx(float((y1.relu() - y0.relu()).abs().mean()))


def test_probe_does_not_change_training():
    from mutransfer.data import vectors

    def run(with_probe: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.2), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        probe_x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
        cbs = [coord.Recorder(coord.Probe(model, probe_x))] if with_probe else []
        train(model, opt, vectors(batch_size=16, seed=0), TrainConfig(steps=4, log_every=4), callbacks=cbs)
        return [p.detach().clone() for p in model.parameters()], cbs

    plain, _ = run(False)
    probed, cbs = run(True)
    for a, b in zip(plain, probed):
        assert torch.equal(a, b)                               # dropout RNG and weights untouched
    assert len(cbs[0].records) == 5                            # t = 0..4


# ---------------------------------------------------------------------------- built-in recipes

@pytest.mark.parametrize("name", ["mlp-pysource", "gpt-pysource"])
def test_builtin_recipes_mup_passes_sp_flagged(name):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    r.coord_check.batch_size = 8
    kw = dict(widths=[32, 64, 128, 256], steps=5, seeds=1)
    mup = _check(r, parametrization="mup", **kw)
    sp = _check(r, parametrization="sp", **kw)
    assert mup.verdict == "ok", [(x.name, x.statistic, x.slope) for x in mup.worst_first[:3]]
    assert sp.verdict == "blowup"
    worst = sp.worst_first[0]
    assert worst.flag in coord.FAILING and worst.slope > coord.BLOWUP_SLOPE
    # the logits (root module) are among the flagged in SP, and stay put in muP
    assert any(x.name == coord.ROOT and x.flag == "blowup" for x in sp.rows)
    assert all(abs(x.slope) < coord.BLOWUP_SLOPE for x in mup.rows if x.name == coord.ROOT)


# ---------------------------------------------------------------------- defects and correct models

DEFECTS = [
    # (factory, data, recipe lr, batch size, module and statistic that must be flagged)
    ("coord_models:attn_sqrt_dhead", SEQ, 1e-2, 8, ("attn.logits", "update")),
    ("coord_models:width_multiplier", VEC, 1e-3, 16, ("act2", "act")),
    ("coord_models:sum_readout", VEC8, 1e-3, 16, (coord.ROOT, "act")),
    ("coord_models:fixed_readout", VEC, 1e-3, 16, (coord.ROOT, "update")),
    ("coord_models:input_multiplier", VEC, 1e-3, 16, ("act1", "act")),
]
CORRECT = [
    ("coord_models:attn_muP", SEQ, 1e-2, 8),
    ("coord_models:mean_readout", VEC8, 1e-3, 16),
    ("coord_models:unequal", VEC, 1e-3, 16),
    ("coord_models:resmlp", VEC, 1e-3, 16),
    ("coord_models:convnet", IMG, 1e-3, 8),
    ("coord_models:rope_muP", SEQ, 1e-2, 8),         # rotary positions, parameter-free norms
    ("coord_models:slice_gate", VEC, 1e-3, 16),      # a gate on a fixed 12-unit slice (regime change 128 -> 256)
]


@pytest.mark.parametrize("factory,data,lr,bs,where", DEFECTS, ids=[d[0].split(":")[1] for d in DEFECTS])
def test_defects_are_flagged_under_mup(factory, data, lr, bs, where):
    res = _recommended(_recipe(factory, data, lr, bs))
    assert res.verdict == "blowup"
    flagged = {(x.name, x.statistic) for x in res.rows if x.flag == "blowup"}
    if where[0] == "attn.logits":     # named structurally: the scale goes like 1/sqrt(d_head)
        assert any(f.startswith("attn: scale 1/√d_head") for f in res.findings), res.findings
    else:
        assert where in flagged, sorted(flagged)


@pytest.mark.parametrize("factory,data,lr,bs", CORRECT, ids=[c[0].split(":")[1] for c in CORRECT])
def test_correct_unusual_models_pass(factory, data, lr, bs):
    res = _recommended(_recipe(factory, data, lr, bs))
    assert res.verdict == "ok", [(x.name, x.statistic, round(x.slope, 2)) for x in res.worst_first[:3]]


# ------------------------------------------------------------------------------------- the command

def _write(tmp_path, name="mlp.yaml", **extra):
    d = {"name": "mlpcc", "model": {"factory": "builtin:mlp", "args": {"in_dim": 32, "out_dim": 10}},
         "data": VEC, "widths": {"proxy": 32, "target": 128},
         "train": {"optimizer": "adamw", "lr": 3e-3, "steps": 10, "batch_size": 8}, **extra}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_command_exit_codes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                # runs/<name>/coord-check/ goes here
    runner = CliRunner()
    recipe = _write(tmp_path)
    out = tmp_path / "out"
    args = ["coord-check", str(recipe), "--widths", "16,32,64,128", "--steps", "3", "--seeds", "1"]
    ok = runner.invoke(app, args + ["--json", str(out / "mup.json"), "--plot", str(out / "mup.png")])
    assert ok.exit_code == 0, ok.output
    data = json.loads((out / "mup.json").read_text())
    assert data["verdict"] == "ok" and data["parametrization"] == "mup"
    assert data["widths"] == [16, 32, 64, 128] and data["steps"] == 3
    names = {m["name"] for m in data["modules"]}
    assert {coord.ROOT, "inp", "hidden.0", "out"} <= names
    for m in data["modules"]:
        assert m["statistic"] in ("act", "update") + coord.SPECTRAL_STATS
        assert m["flag"] in coord.FLAGS and "interval" in m and "se" in m
        assert len(m["values"]) == 4 and isinstance(m["slope"], float)
    w, h = _png_size(out / "mup.png")
    assert w > 600 and h > 400

    sp = runner.invoke(app, args + ["--parametrization", "sp", "--lr", "0.03", "--json", str(out / "sp.json")])
    assert sp.exit_code == 1, sp.output
    assert json.loads((out / "sp.json").read_text())["verdict"] == "blowup"
    assert "blowup" in sp.output
    assert len(list((tmp_path / "runs" / "mlpcc" / "coord-check").glob("*/w*-s0.json"))) == 8   # 4 widths x 2


def test_interrupted_check_resumes_from_saved_runs(tmp_path, monkeypatch):
    r = _recipe("builtin:mlp", VEC, 3e-3, batch_size=8)
    s = coord.resolve(r, widths=[16, 32, 64], steps=2, seeds=1)
    real = coord_measure.measure_one
    calls = []

    def interrupted(recipe, s_, w, k, x, batches=None):
        if w == 64:
            raise KeyboardInterrupt
        calls.append(w)
        return real(recipe, s_, w, k, x, batches)

    monkeypatch.setattr(coord_measure, "measure_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        coord.run(r, s, cache_dir=tmp_path)
    assert calls == [16, 32]
    calls.clear()
    monkeypatch.setattr(coord_measure, "measure_one", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    resumed = coord.run(r, s, cache_dir=tmp_path)
    assert calls == [64]                                       # 16 and 32 were loaded, not retrained
    fresh = coord.run(r, s)
    assert [(x.name, x.statistic, x.values) for x in resumed.rows] == \
        [(x.name, x.statistic, x.values) for x in fresh.rows]
    other = coord.resolve(r, widths=[16, 32, 64], steps=3, seeds=1)
    assert coord.cache_key(r, other) != coord.cache_key(r, s)  # other settings never reuse these runs


@pytest.mark.parametrize("extra,needle", [
    (["--widths", "64,abc"], "--widths"),
    (["--widths", "64"], "--widths"),
    (["--optimizer", "lion"], "--optimizer"),
    (["--parametrization", "ntk"], "--parametrization"),
    (["--steps", "0"], "--steps"),
    (["--json", "{tmp}/x.txt"], "--json"),
    (["--plot", "{tmp}/x.jpg"], "--plot"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, monkeypatch, extra, needle):
    monkeypatch.chdir(tmp_path)
    recipe = _write(tmp_path)
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    r = CliRunner().invoke(app, ["coord-check", str(recipe), "--steps", "1"] + extra)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.yaml"]


def test_bad_recipe_and_factory_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    bad = _write(tmp_path, "bad.yaml", coord_check={"widths": [64], "steps": 3})
    r = runner.invoke(app, ["coord-check", str(bad)])
    assert r.exit_code == 2 and "coord_check.widths" in r.output
    nofac = _write(tmp_path, "nofac.yaml")
    d = yaml.safe_load(nofac.read_text())
    d["model"]["factory"] = "no_such_module_xyz:f"
    nofac.write_text(yaml.safe_dump(d))
    r = runner.invoke(app, ["coord-check", str(nofac), "--steps", "1"])
    assert r.exit_code == 2 and "model.factory" in r.output and "Traceback" not in r.output
    gpt = tmp_path / "gpt.yaml"
    gpt.write_text(yaml.safe_dump({
        "name": "g", "model": {"factory": "builtin:gpt", "args": {"layers": 1, "heads": 4, "seq_len": 16}},
        "data": {"factory": "builtin:pysource", "args": {"seq_len": 16}}, "widths": {"proxy": 32, "target": 64},
        "train": {"optimizer": "adamw", "lr": 3e-3, "steps": 10, "batch_size": 4}}))
    r = runner.invoke(app, ["coord-check", str(gpt), "--widths", "32,64,66", "--steps", "1"])
    assert r.exit_code == 2 and "heads (4) must divide the width (66)" in r.output
    assert not (tmp_path / "runs").exists()                    # checked before anything trained


def test_json_schema_of_a_result():
    r = _recipe("builtin:mlp", VEC, 3e-3, batch_size=8)
    res = _check(r, widths=[16, 32], steps=2, seeds=2)
    d = to_json(res)
    assert set(d) >= {"verdict", "parametrization", "widths", "steps", "modules"}
    m = d["modules"][0]
    assert set(m) >= {"name", "statistic", "values", "slope", "flag"}
    assert len(m["series"][0]) == 3                           # t = 0..2


def test_a_diverging_run_is_a_blowup():
    r = _recipe("builtin:mlp", VEC, 3e-3, batch_size=8)
    res = _check(r, widths=[16, 64], steps=4, seeds=1, lr=1e6, optimizer="sgd", parametrization="sp")
    assert res.diverged and res.verdict == "blowup"
    assert "width" in res.diverged[0] and "loss" in res.diverged[0]
    assert json_safe(to_json(res))


def json_safe(d) -> bool:
    json.loads(json.dumps(d, allow_nan=False))               # strict JSON: no NaN/Infinity tokens
    return True
