"""`mutransfer sweep`: the pure optimum/drift rules, flag parsing, the per-point cache, the JSON/PNG
outputs and the exit codes. Tiny widths and steps (a few seconds in all)."""
import json
import math
import struct

import pytest
import yaml
from typer.testing import CliRunner

from mutransfer.cli import app
from mutransfer.commands import sweep as sw
from mutransfer.errors import UserError
from mutransfer.report.sweep_fit import drift, mean_or_none, optimum, parabola_vertex, shared_index, wider_is_better
from mutransfer.run.experiment import build
from mutransfer.run.recipe import parse_recipe

TINY = {
    "name": "tiny-sweep",
    "model": {"factory": "builtin:mlp", "args": {"vocab": 256, "context": 4, "out_dim": 256, "depth": 2}},
    "data": {"factory": "builtin:pysource", "args": {"format": "window", "context": 4, "max_bytes": 200000}},
    "loss": "cross_entropy",
    "widths": {"proxy": 16, "target": 32},
    "train": {"optimizer": "adamw", "lr": 0.01, "steps": 12, "batch_size": 8, "seed": 0},
}


@pytest.fixture
def recipe_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def _cli(*args):
    return CliRunner().invoke(app, ["sweep", *map(str, args)])


# ----------------------------------------------------------------------------------------------- pure rules

def test_parabola_recovers_a_quadratic_minimum_on_an_uneven_grid():
    f = lambda x: 2.0 * (x + 3.3) ** 2 + 1.0  # noqa: E731
    xs = [-5.0, -4.0, -2.5]
    assert parabola_vertex(xs, [f(x) for x in xs]) == pytest.approx(-3.3)
    assert parabola_vertex(xs, [-f(x) for x in xs]) is None  # opens downwards: no minimum


def test_optimum_refines_inside_the_grid_and_flags_edges_and_divergence():
    xs = [-6.0, -5.0, -4.0, -3.0, -2.0]
    ys = [(x + 4.4) ** 2 for x in xs]
    o = optimum(xs, ys)
    assert o.best_index == 2 and not o.at_edge and o.log2 == pytest.approx(-4.4)
    # monotone curve: the best point is the last one, flagged as at the edge
    o = optimum(xs, [5, 4, 3, 2, 1])
    assert o.at_edge and o.log2 == -2.0
    # a diverged neighbour: no fit, the best grid point itself
    o = optimum(xs, [3.0, 2.0, 1.0, None, None])
    assert o.log2 == -4.0 and o.best_index == 2
    assert optimum(xs, [None] * 5).log2 is None


def test_drift_shared_index_and_wider_is_better():
    assert drift([-5.0, -4.5, None, -6.0]) == pytest.approx(1.5)
    assert drift([-5.0, None]) is None
    curves = [[3.0, 2.0, 2.5], [2.9, 1.8, None], [2.8, 1.7, 2.0]]
    assert shared_index(curves) == 1          # index 2 diverged at one width, so it is not shared
    assert shared_index([[None], [1.0]]) is None
    assert wider_is_better([(64, 2.0), (128, 1.9), (256, 1.8)]) == (True, [])
    assert wider_is_better([(256, 1.95), (64, 2.0), (128, 1.9)]) == (False, [(128, 256)])
    assert mean_or_none([1.0, 3.0]) == 2.0 and mean_or_none([1.0, None]) is None


def test_lr_range_is_log_spaced_and_inclusive():
    v = sw.parse_range("1e-4:1e-1:4")
    assert v[0] == pytest.approx(1e-4) and v[-1] == pytest.approx(1e-1)
    assert [math.log10(x) for x in v] == pytest.approx([-4, -3, -2, -1])
    for bad in ("1e-4:1e-1", "1e-1:1e-4:4", "0:1:4", "1e-4:1e-1:1", "a:b:c"):
        with pytest.raises(UserError) as e:
            sw.parse_range(bad)
        assert e.value.where == "--lr-range"


def test_config_defaults_and_checks():
    r = parse_recipe(TINY)
    cfg = sw.make_config(r)
    assert cfg.widths == (16, 32) and cfg.parametrizations == ("mup", "sp") and cfg.param == "lr"
    assert len(cfg.values) == 11 and cfg.values[5] == pytest.approx(0.01)   # octaves around train.lr
    assert cfg.steps == 12 and cfg.average_last == 5
    assert sw.default_widths(64, 1024) == [64, 128, 256, 512, 1024]
    assert sw.make_config(r, param="output_mult").values[5] == pytest.approx(1.0)
    for kw, where in (({"param": "beta1"}, "--param"), ({"values": [0.1, -1.0]}, "--lrs"),
                      ({"widths": [16, 0]}, "--widths"), ({"parametrization": "ntk"}, "--parametrization")):
        with pytest.raises(UserError) as e:
            sw.make_config(r, **kw)
        assert e.value.where == where
    with pytest.raises(UserError) as e:
        parse_recipe({**TINY, "sweep": {"param": "momentum"}})
    assert "sweep.param" in e.value.where


# ----------------------------------------------------------------------------------------------- end to end

def test_sweep_writes_json_and_png_records_divergence_and_caches(recipe_file, tmp_path, monkeypatch):
    res = _cli(recipe_file, "--widths", "16,32", "--lrs", "0.003,0.03,1e4", "--json", "out/s.json",
               "--plot", "out/s.png")
    assert res.exit_code == 3, res.output                       # one seed: the transfer verdict is inconclusive
    assert "μP optimum drift" in res.output and "wider" in res.output
    assert res.output.strip().splitlines()[-3].startswith("μP: transfer inconclusive")   # the rule's arm last
    assert "rerun with --seeds 3" in res.output
    d = json.loads((tmp_path / "out/s.json").read_text())
    assert d["transfer_verdict"] == {"arm": "mup", "verdict": "inconclusive", "exit_code": 3}
    assert set(d["transfer"]) == {"mup", "sp"} and d["transfer"]["mup"]["seeds"] == 1
    assert set(d["results"]) == {"mup", "sp"} and set(d["drift_octaves"]) == {"mup", "sp"}
    for par in ("mup", "sp"):
        for w in ("16", "32"):
            e = d["results"][par][w]
            assert e["lrs"] == pytest.approx([0.003, 0.03, 1e4])
            assert e["losses"][2] is None                       # LR 1e4 diverged: kept, as null
            assert all(isinstance(x, float) for x in e["losses"][:2])
            assert e["losses"][1] < e["losses"][0] - 0.5          # 12 steps: the larger LR learned more
            assert e["best_log2_lr"] == pytest.approx(math.log2(0.03))  # its neighbour diverged: no fit
    # the SP control is the same model as muP at the proxy width (so the sweep trains it once), not wider
    assert d["results"]["sp"]["16"]["losses"] == d["results"]["mup"]["16"]["losses"]
    assert d["results"]["sp"]["32"]["losses"][:2] != d["results"]["mup"]["32"]["losses"][:2]
    r = parse_recipe(TINY)
    assert build(r, 16, parametrization="sp").plan.params == build(r, 16, parametrization="mup").plan.params
    png = (tmp_path / "out/s.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", png[16:24])
    assert w > 600 and h > 300
    cache = sorted((tmp_path / "runs/tiny-sweep/sweep").glob("*/*.json"))
    assert len(cache) == 12

    # a rerun with one more LR trains only the new points; cached ones are read back
    calls = []
    real = sw.run_point
    monkeypatch.setattr(sw, "run_point", lambda r, c, p, dev="cpu": calls.append(p) or real(r, c, p, dev))
    res = _cli(recipe_file, "--widths", "16,32", "--lrs", "0.003,0.01,0.03,1e4", "--json", "out/s2.json")
    assert res.exit_code == 3, res.output
    assert sorted((c.parametrization, c.width, c.value) for c in calls) == sorted(
        [("mup", 16, 0.01), ("mup", 32, 0.01), ("sp", 32, 0.01)])  # SP at the proxy: muP's twin
    d2 = json.loads((tmp_path / "out/s2.json").read_text())
    assert d2["results"]["mup"]["32"]["losses"][0] == d["results"]["mup"]["32"]["losses"][0]
    # a different setup (steps) does not reuse the cache
    calls.clear()
    assert _cli(recipe_file, "--widths", "16", "--lrs", "0.003", "--steps", "6",
                "--parametrization", "mup").exit_code == 3         # one width: nothing to transfer to
    assert len(calls) == 1
    assert len(list((tmp_path / "runs/tiny-sweep/sweep").glob("*/*.json"))) == 17  # both setups kept


def test_param_sweep_and_parallel_workers_agree_with_serial(recipe_file, tmp_path):
    r = parse_recipe(TINY)
    cfg = sw.make_config(r, widths=[32], values=[0.5, 2.0], param="output_mult", parametrization="mup")
    serial = sw.run_grid(r, cfg, tmp_path / "a", workers=1, progress=False)
    parallel = sw.run_grid(r, cfg, tmp_path / "b", workers=2, progress=False)
    assert set(serial) == set(parallel) and len(serial) == 2
    for p in serial:
        assert parallel[p]["loss"] == pytest.approx(serial[p]["loss"], rel=1e-4)
    assert serial[sw.Point("mup", 32, 0.5, 0)]["loss"] != serial[sw.Point("mup", 32, 2.0, 0)]["loss"]
    s = sw.summarize(serial, cfg)
    assert s["param"] == "output_mult" and "values" in s["results"]["mup"]["32"]
    assert "best_log2_value" in s["results"]["mup"]["32"] and list(s["results"]) == ["mup"]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(recipe_file, tmp_path):
    for args, where in ((["--lr-range", "1:0.1:3"], "--lr-range"), (["--param", "beta1"], "--param"),
                        (["--widths", "16,x"], "--widths"), (["--plot", "p.jpg"], "--plot"),
                        (["--lrs", "0.1", "--lr-range", "1e-3:1e-1:3"], "--lrs"),
                        (["--workers", "0"], "--workers")):
        res = _cli(recipe_file, *args)
        assert res.exit_code == 2, (args, res.output)
        assert f"error: {where}" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
    res = _cli(tmp_path / "missing.yaml")
    assert res.exit_code == 2 and "recipe file not found" in res.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "p.jpg").exists()


def test_every_point_diverging_exits_1(recipe_file):
    res = _cli(recipe_file, "--widths", "16", "--lrs", "1e4,1e5", "--parametrization", "mup")
    assert res.exit_code == 1, res.output
    assert "diverged" in res.output


def test_a_crashing_point_is_reported_and_not_cached(recipe_file, tmp_path):
    (tmp_path / "crashy.py").write_text(
        "import torch\n"
        "from mutransfer.models import mlp\n"
        "class Crashy(torch.nn.Module):\n"
        "    def __init__(self, width, **kw):\n"
        "        super().__init__()\n"
        "        self.m, self.width = mlp(width=width, **kw), width\n"
        "    def forward(self, x):\n"
        "        if self.width == 32:\n"
        "            raise RuntimeError('boom at 32')\n"
        "        return self.m(x)\n"
        "def model(width, **kw):\n"
        "    return Crashy(width, **kw)\n")
    p = tmp_path / "crashy.yaml"
    p.write_text(yaml.safe_dump({**TINY, "name": "crashy", "model": {**TINY["model"], "factory": "crashy:model"}}))
    res = _cli(p, "--widths", "16,32", "--lrs", "0.03", "--parametrization", "mup", "--json", "c.json")
    assert res.exit_code == 3, res.output                       # width 32 has no loss: inconclusive
    assert "1 point(s) failed" in res.output and "boom at 32" in res.output
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["results"]["mup"]["32"]["losses"] == [None] and d["results"]["mup"]["16"]["losses"][0] is not None
    assert [f.name for f in (tmp_path / "runs/crashy/sweep").glob("*/*.json")] == ["mup-w16-lr0.03-s0.json"]


@pytest.mark.slow
def test_builtin_mlp_transfer_holds_under_mup_and_fails_under_sp(tmp_path, monkeypatch):
    """The transfer verdict on real runs: the built-in MLP, widths 16 and 256, 3 seeds, 40 steps."""
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "mlp.yaml"
    p.write_text(yaml.safe_dump({**TINY, "name": "mlp-transfer",
                                 "train": {**TINY["train"], "steps": 40, "batch_size": 16}}))
    lrs = ",".join(str(2.0 ** k) for k in range(-6, 0))
    res = _cli(p, "--widths", "16,256", "--lrs", lrs, "--seeds", "3", "--json", "t.json")
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[-2].startswith("μP: transfer holds: optimum lr drift") and "regret at width 256" in lines[-2]
    assert any(ln.startswith("SP: transfer fails") for ln in lines)
    d = json.loads((tmp_path / "t.json").read_text())
    mup, sp = d["transfer"]["mup"], d["transfer"]["sp"]
    assert mup["verdict"] == "holds" and sp["verdict"] == "fails"
    assert abs(mup["drift"]["octaves"]) < 1 and mup["regret"]["interval"][1] <= 0.02
    assert sp["drift"]["octaves"] < -2                      # SP's optimum LR falls with width
    # the SP arm alone (read back from the cache): the verdict follows it, exit 1
    res = _cli(p, "--widths", "16,256", "--lrs", lrs, "--seeds", "3", "--parametrization", "sp")
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith("SP: transfer fails")
