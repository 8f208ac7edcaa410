"""Verdicts you can trust (issue 21): uncertainty in every coord-check verdict (inconclusive, exit 3),
the update judged in feature space, regime changes of the rule honoured at either end of the ladder,
the one result cache, and the sweep's transfer verdict. The three false alarms of the issue are
reproduced on small models (tests/coord_models.py); the pure rules on the issue's own numbers."""
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mutransfer.commands import sweep as sw
from mutransfer.report.sweep_fit import transfer, transfer_line
from mutransfer.run import coord
from mutransfer.run.coord_spectral import FEATURE, OPERATOR, feature_ratio, init_target
from mutransfer.run.coord_verdict import SEED_SE_PRIOR, band, decide, regime_changes, window
from mutransfer.run.recipe import parse_recipe
from mutransfer.run.result_cache import ResultCache, cache_key

sys.path.insert(0, str(Path(__file__).parent))   # coord_models, for "coord_models:NAME" factories


def _settings(widths, seeds, steps=1):
    return coord.Settings(tuple(widths), steps, seeds, 1e-3, "adamw", "mup", 8)


def _runs(widths, per_seed: dict[str, list[list[float]]], steps=1):
    """Runs whose last record holds, per module, (act, update) = (value, value / 10)."""
    seeds = len(next(iter(per_seed.values())))
    runs = []
    for i, w in enumerate(widths):
        for k in range(seeds):
            last = {n: (v[k][i], v[k][i] / 10) for n, v in per_seed.items()}
            recs = [{n: (1.0, 0.0) for n in per_seed}] + [last] * steps
            runs.append(coord.Run(w, k, recs))
    return runs


# ------------------------------------------------------------------------------- uncertainty, pure

def test_the_issue_s_seed_noise_is_not_a_blowup_but_a_trend_is():
    # the issue's small CNN: readout act 0.109, 0.204, 0.167 past the regime change, spread ±0.21
    ws = [16, 32, 64]
    noisy = {"head": [[0.08, 0.25, 0.20], [0.12, 0.20, 0.12], [0.127, 0.162, 0.181]]}
    res = coord.verdict(_runs(ws, noisy), _settings(ws, 3))
    row = next(r for r in res.rows if (r.name, r.statistic) == ("head", "act"))
    assert row.slope == pytest.approx(0.31, abs=0.01) and row.spread > 0.15
    assert coord.flag("act", row.slope) == "blowup"            # the point estimate alone: the old false alarm
    assert row.flag == "ok" and res.verdict == "ok" and res.exit_code == 0
    trend = {"head": [[0.10, 0.14, 0.20], [0.11, 0.15, 0.22]]}
    res = coord.verdict(_runs(ws, trend), _settings(ws, 2))
    assert res.verdict == "blowup" and res.exit_code == 1


def test_too_few_seeds_say_inconclusive_with_the_seeds_to_rerun_with():
    ws = [16, 32, 64]
    unsure = {"head": [[0.10, 0.13, 0.21], [0.10, 0.15, 0.16]]}
    res = coord.verdict(_runs(ws, unsure), _settings(ws, 2))
    row = next(r for r in res.rows if (r.name, r.statistic) == ("head", "act"))
    lo, hi = row.interval
    assert lo < coord.BLOWUP_SLOPE < row.slope < hi
    assert row.flag == "inconclusive" and row.seeds_needed == 4
    assert res.verdict == "inconclusive" and res.exit_code == 3
    assert res.verdict_line == "inconclusive: rerun with --seeds 4"
    d = res.to_json()
    json.loads(json.dumps(d, allow_nan=False))
    assert d["verdict"] == "inconclusive" and d["exit_code"] == 3 and d["seeds_advice"] == 4
    m = next(m for m in d["modules"] if (m["name"], m["statistic"]) == ("head", "act"))
    assert m["flag"] == "inconclusive" and "--seeds 4" in m["why"] and m["interval"][0] < 0.3 < m["interval"][1]


def test_one_seed_uses_the_fit_and_a_prior_and_clear_slopes_still_decide():
    ws = [64, 128, 256, 512]
    sp_like = band(ws, [[0.1 * (w / 64) ** 0.7 for w in ws]])       # an exact power law, one seed
    assert sp_like.se == pytest.approx(SEED_SE_PRIOR)
    assert decide("act", sp_like) == "blowup"
    borderline = band(ws, [[0.1 * (w / 64) ** 0.35 for w in ws]])
    assert decide("act", borderline) == "inconclusive"
    bent = band(ws, [[0.1, 0.1, 0.25, 0.2]])                        # not a power law: the fit's se
    assert bent.se > 0.1


def test_spectral_rows_are_judged_both_ways_with_their_band():
    ws = [16, 32, 64, 128]
    assert decide("‖W₀‖", band(ws, [[1.0, 0.5, 0.25, 0.125], [1.0, 0.52, 0.24, 0.13]])) == "mis-scaled"
    assert decide(FEATURE, band(ws, [[1.0, 1.1, 0.95, 1.05], [1.0, 0.9, 1.1, 1.0]])) == "ok"


# ---------------------------------------------------------------------------------- regime changes

def test_regime_change_between_the_last_two_widths_is_judged_against_the_rule():
    ws = [64, 128, 256]
    fans = {"gate.weight": {64: (12, 4), 128: (12, 8), 256: (12, 16)}, "hidden.weight": {w: (w, w) for w in ws}}
    assert regime_changes(fans) == [("gate.weight", 128, 256)]
    assert window(regime_changes(fans), ws).open_changes == (("gate.weight", 128, 256),)
    # the issue's gate: 0.48 -> 0.72 -> 0.79, the rule's own sqrt(fan_out/fan_in) regime, then flat
    gate = [[0.48 * f, 0.72 * f, 0.79 * f] for f in (1.0, 1.05, 0.97)]
    runs = _runs(ws, {"gate": gate, "hidden": [[0.5, 0.5, 0.51], [0.5, 0.49, 0.5], [0.52, 0.5, 0.5]]})
    old = coord.judged(ws, [0.48, 0.72, 0.79], "act")               # the whole ladder, as before: a false alarm
    assert old[0] > coord.BLOWUP_SLOPE
    res = coord.verdict(runs, _settings(ws, 3), fans)
    row = next(r for r in res.rows if (r.name, r.statistic) == ("gate", "act"))
    assert row.flag == "ok" and abs(row.slope) < 0.15 and "rule's own slope" in row.why
    assert res.verdict == "ok"
    assert any(n.startswith("gate.weight: the rule's min(1, √(fan_out/fan_in)) changes branch between widths 128 "
                            "and 256") and "add a width above 256" in n for n in res.notes)
    # a row downstream growing (+0.38) within what the gate's own factor carries along: ok
    carried = [[0.1 * f, 0.13 * f, 0.17 * f] for f in (1.0, 1.02, 0.99)]
    res = coord.verdict(_runs(ws, {"gate": gate, "attn": carried}), _settings(ws, 3), fans)
    row = next(r for r in res.rows if (r.name, r.statistic) == ("attn", "act"))
    assert row.flag == "ok" and "rule's own growth of gate.weight" in row.why
    # growing faster than that across an unisolated change: not a blowup, but not ok either
    grow = [[0.1, 0.2, 0.4], [0.1, 0.21, 0.41], [0.1, 0.2, 0.42]]
    res = coord.verdict(_runs(ws, {"gate": gate, "attn": grow}), _settings(ws, 3), fans)
    row = next(r for r in res.rows if (r.name, r.statistic) == ("attn", "act"))
    assert row.flag == "inconclusive" and "add a width above 256" in row.why


def test_regime_change_in_the_first_pair_judges_other_rows_past_it():
    ws = [8, 16, 32, 64]
    fans = {"stem.weight": {8: (9, 8), 16: (9, 16), 32: (9, 32), 64: (9, 64)}}
    grow_then_flat = [[0.05, 0.1, 0.1, 0.1], [0.05, 0.1, 0.102, 0.099]]
    res = coord.verdict(_runs(ws, {"blocks": grow_then_flat}), _settings(ws, 2), fans)
    row = next(r for r in res.rows if (r.name, r.statistic) == ("blocks", "act"))
    assert row.judged_widths == [16, 32, 64] and row.flag == "ok"
    assert any("other slopes from width 16 on" in n for n in res.notes)


def test_init_target_has_no_slope_across_a_branch_change():
    # a Gaussian matrix with the rule's sigma: ||W||_2 / init_target stays put where the fans cross
    g = torch.Generator().manual_seed(0)
    ratios = []
    for fo in (4, 8, 16, 32):
        fi = 12
        sigma = min(1.0, math.sqrt(fo / fi)) / math.sqrt(fi)
        w = torch.randn(fo * 8, fi * 8, generator=g) * sigma / math.sqrt(8)   # x8 sizes: less finite-size noise
        ratios.append(float(torch.linalg.matrix_norm(w, 2)) / init_target(fi * 8, fo * 8, "out_in"))
    assert max(ratios) / min(ratios) < 1.1


# ---------------------------------------------------------------------------------- feature space

def test_feature_ratio_is_rms_of_dw_x_over_rms_of_x():
    torch.manual_seed(0)
    lin, conv, emb = nn.Linear(6, 5), nn.Conv2d(3, 4, 3, padding=1), nn.Embedding(10, 4)
    x, img, idx = torch.randn(7, 6), torch.randn(2, 3, 5, 5), torch.tensor([[1, 2, 2]])
    dw = torch.randn(5, 6)
    assert feature_ratio(lin, "weight", dw, x, "out_in") == pytest.approx(
        float(F.linear(x, dw).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()), rel=1e-5)
    dk = torch.randn(4, 3, 3, 3)
    assert feature_ratio(conv, "weight", dk, img, "out_in") == pytest.approx(
        float(F.conv2d(img, dk, padding=1).pow(2).mean().sqrt() / img.pow(2).mean().sqrt()), rel=1e-5)
    de = torch.zeros(10, 4)
    de[2] = 1.0
    assert feature_ratio(emb, "weight", de, idx, "embedding") == pytest.approx(math.sqrt(2 / 3))  # rows 1, 2, 2
    assert feature_ratio(lin, "bias_like", dw, x, "out_in") is None   # a raw parameter: not known how it is used


# ------------------------------------------------------------------------------------ result cache

def test_result_cache_reads_back_only_what_it_wrote_for_this_setup(tmp_path):
    key = cache_key({"model": "mlp", "steps": 3})
    assert key == cache_key({"steps": 3, "model": "mlp"}) != cache_key({"model": "mlp", "steps": 4})
    c = ResultCache(tmp_path, key)
    c.save("a.json", {"loss": 1.5, "seed": 0})
    assert c.load("a.json") == {"loss": 1.5, "seed": 0}
    assert ResultCache(tmp_path, key).path("a.json").parent.name == key
    assert ResultCache.in_folder(c.folder, "other").load("a.json") is None    # another setup's key
    d = json.loads(c.path("a.json").read_text())
    d["loss"] = 1.4                                                           # edited by hand
    c.path("a.json").write_text(json.dumps(d))
    assert c.load("a.json") is None
    c.path("b.json").write_text('{"loss": 1.')                                # cut short
    assert c.load("b.json") is None and c.load("missing.json") is None


# --------------------------------------------------------------------- the three false alarms, real

def _recipe(model, data, lr, bs, **args):
    return parse_recipe({"name": "cc", "model": {"factory": model, "args": args}, "data": data,
                         "widths": {"proxy": 64, "target": 512},
                         "train": {"optimizer": "adamw", "lr": lr, "steps": 100, "batch_size": bs}})


VEC = {"factory": "builtin:vectors", "args": {"dim": 32, "classes": 10}}
IMG = {"factory": "builtin:images", "args": {"size": 6}}


def test_a_gate_on_a_fixed_slice_changing_regime_at_the_ladder_s_end_passes():
    r = _recipe("coord_models:slice_gate", VEC, 1e-3, 16)
    res = coord.run(r, coord.resolve(r, widths=[64, 128, 256], steps=3, seeds=2))
    assert res.verdict == "ok", [(x.name, x.statistic, x.values, x.flag) for x in res.rows if x.flag != "ok"]
    gate = next(x for x in res.rows if (x.name, x.statistic) == ("gate", "act"))
    assert gate.values[0] < gate.values[1] < gate.values[2]          # it grows, as the rule says it should
    assert "rule's own slope" in gate.why
    assert any(n.startswith("gate.weight: the rule's min(1, √(fan_out/fan_in)) changes branch between widths 128")
               for n in res.notes)


def test_a_batchnorm_resnet_with_adamw_passes_and_its_convs_are_judged_in_feature_space():
    r = _recipe("coord_models:bn_resnet", IMG, 1e-3, 8)
    res = coord.run(r, coord.resolve(r, widths=[16, 32, 64], steps=3, seeds=2))
    assert res.verdict == "ok", [(x.name, x.statistic, x.values, x.flag) for x in res.rows if x.flag != "ok"]
    stats = {x.name: x.statistic for x in res.rows if x.statistic in (FEATURE, OPERATOR)}
    assert stats["stem1.weight"] == stats["stem2.weight"] == stats["conv_a.weight"] == FEATURE
    assert stats["head.weight"] == FEATURE


# ----------------------------------------------------------------------------- sweep's verdict

def _grid(cfg, optimum_at, noise, rng):
    """Synthetic sweep results: a bowl in log2(value) with its optimum at optimum_at(par, width)."""
    out = {}
    for p in cfg.points():
        x = math.log2(p.value)
        c = optimum_at(p.parametrization, p.width)
        loss = 2.0 + 0.05 * (x - c) ** 2 - 0.1 * math.log2(p.width / 16) + rng.gauss(0, noise)
        out[p] = {"loss": loss}
    return out


TINY = {"name": "t", "model": {"factory": "builtin:mlp", "args": {"vocab": 256, "context": 4, "out_dim": 256}},
        "data": {"factory": "builtin:pysource", "args": {"format": "window", "context": 4}},
        "widths": {"proxy": 16, "target": 128}, "train": {"optimizer": "adamw", "lr": 0.01, "steps": 12,
                                                             "batch_size": 8}}


def test_sweep_summary_says_holds_for_a_fixed_optimum_and_fails_for_a_drifting_one():
    r = parse_recipe(TINY)
    values = [2.0 ** k for k in range(-10, -2)]
    cfg = sw.make_config(r, widths=[16, 32, 64, 128], values=values, seeds=3)
    where = lambda par, w: -7.0 if par == "mup" else -7.0 - math.log2(w / 16)   # noqa: E731  SP: LR ~ 1/width
    s = sw.summarize(_grid(cfg, where, 0.005, random.Random(1)), cfg)
    mup, sp = s["transfer"]["mup"], s["transfer"]["sp"]
    assert mup["verdict"] == "holds" and sp["verdict"] == "fails"
    assert s["transfer_verdict"] == {"arm": "mup", "verdict": "holds", "exit_code": 0}
    assert sp["drift"]["octaves"] == pytest.approx(-3, abs=0.3) and sp["drift"]["interval"][1] < -1
    assert mup["regret"]["interval"][1] < 0.02 < sp["regret"]["interval"][0]
    lo, hi = mup["optima"]["128"]["interval"]
    assert lo <= mup["optima"]["128"]["optimum"] <= hi and hi - lo < 1
    line = transfer_line(sp, "SP")
    assert line.startswith("SP: transfer fails: optimum lr drift -") and "regret at width 128" in line
    json.loads(json.dumps(s, allow_nan=True))


def test_sweep_with_one_seed_or_a_noisy_grid_is_inconclusive():
    r = parse_recipe(TINY)
    values = [2.0 ** k for k in range(-10, -2)]
    where = lambda par, w: -7.0  # noqa: E731
    one = sw.make_config(r, widths=[16, 128], values=values, seeds=1, parametrization="mup")
    s = sw.summarize(_grid(one, where, 0.005, random.Random(2)), one)
    assert s["transfer"]["mup"]["verdict"] == "inconclusive" and "--seeds 3" in s["transfer"]["mup"]["why"]
    assert s["transfer_verdict"]["exit_code"] == 3
    noisy = sw.make_config(r, widths=[16, 128], values=values, seeds=2, parametrization="mup")
    s = sw.summarize(_grid(noisy, where, 0.08, random.Random(3)), noisy)
    t = s["transfer"]["mup"]
    assert t["verdict"] == "inconclusive", transfer_line(t, "μP")
    assert t["regret"]["interval"][1] > 0.02 or t["drift"]["interval"][1] - t["drift"]["interval"][0] > 2


def test_an_optimum_at_the_grid_s_edge_is_never_a_hold():
    xs = [-9.0, -8.0, -7.0]
    curves = {16: [[3.0, 2.5, 2.0], [3.0, 2.5, 2.01]], 64: [[2.9, 2.4, 1.9], [2.9, 2.41, 1.9]]}
    t = transfer(xs, curves)
    assert t["verdict"] == "inconclusive" and "edge" in t["why"]
    assert t["optima"]["16"]["interval"][1] is None                 # open towards outside (strict JSON: null)
    json.loads(json.dumps(t, allow_nan=False))


def test_a_small_cnn_with_seed_noise_is_not_a_blowup():
    # channels 8 -> 64, one input channel (the stem's and the readout's branch change between 8 and 16),
    # the defaults a user runs (3 seeds, 5 steps) at 10x the LR: the readout's act jumps around by seed
    # (1.02, 0.51, 1.62, 1.21); before issue 21 this was "blowup", slope +0.62 over widths 16..64
    img1 = {"factory": "builtin:images", "args": {"size": 8, "channels": 1}}
    r = _recipe("builtin:cnn", img1, 1e-2, 16, in_channels=1, classes=10, blocks=1)
    res = coord.run(r, coord.resolve(r, widths=[8, 16, 32, 64]))
    head = next(x for x in res.rows if (x.name, x.statistic) == ("head", "act"))
    assert head.slope > coord.BLOWUP_SLOPE and head.spread > 0.2        # the point estimate alone says blowup
    assert res.verdict != "blowup", [(x.name, x.statistic, x.values, x.flag) for x in res.rows if x.flag != "ok"]
    assert head.flag in ("ok", "inconclusive")


# ------------------------------------------------------------------------------- one home for each rule

def test_one_home_for_the_regime_test_the_cache_and_the_measuring_loop():
    pkg = Path(__file__).resolve().parents[1] / "mutransfer"
    src = {p.relative_to(pkg).as_posix(): p.read_text() for p in pkg.rglob("*.py")}
    # the rule's branch test: only coord_verdict.regime_changes compares fan_out with fan_in for it
    assert [n for n, t in src.items() if "(foa >= fia)" in t or "fan_out >= p.fan_in" in t] == ["run/coord_verdict.py"]
    # one key scheme (hashing) for the result caches of coord-check and sweep
    assert [n for n, t in src.items() if "hashlib" in t and ("coord" in n or "sweep" in n or "cache" in n)] == \
        ["run/result_cache.py"]
    # the Python API measures through the CLI's measure_model, with no probe loop of its own
    api = src["commands/coord_api.py"]
    assert "measure_model(" in api and "Recorder(" not in api and "SpectralRecorder(" not in api
    assert len(src["run/coord.py"].splitlines()) < 80
