"""The horizon and batch axis: the pure rules against hand-computed values, the identity at the proxy's
run, the exponent fit on a synthetic loss surface, the recipe's `target:` section, and the commands
(scale, sweep --horizons / --batch-sizes, the transfer check) on tiny models."""
import json
import math
import random

import pytest
import yaml
from typer.testing import CliRunner

from mutransfer.cli import app
from mutransfer.commands.scale import transfer_check
from mutransfer.engine import horizon as H
from mutransfer.engine.hparams import HParams
from mutransfer.engine.plan import at_horizon, make_plan
from mutransfer.report.horizon_fit import fit_exponent, is_early, loss_at, transfer_gap
from mutransfer.run.experiment import horizon_factors, shapes_for, target_run
from mutransfer.run.recipe import parse_recipe

from helpers import one_line

TINY = {
    "name": "tiny-h",
    "model": {"factory": "builtin:mlp", "args": {"vocab": 256, "context": 4, "out_dim": 256, "depth": 2}},
    "data": {"factory": "builtin:pysource", "args": {"format": "window", "context": 4, "max_bytes": 200000}},
    "loss": "cross_entropy",
    "widths": {"proxy": 16, "target": 32},
    "train": {"optimizer": "adamw", "lr": 0.01, "steps": 12, "batch_size": 8, "seed": 0, "warmup": 2,
              "schedule": "cosine", "weight_decay": 0.1},
}


def _recipe(**target):
    d = dict(TINY)
    if target:
        d = {**d, "target": target}
    return parse_recipe(d)


# ----------------------------------------------------------------------------------------------- pure rules

def test_rules_by_hand():
    assert H.horizon_lr_ratio(200, 3200, 0.25) == pytest.approx(16 ** -0.25)    # 0.5
    assert H.horizon_lr_ratio(200, 3200, 0.25) == pytest.approx(0.5)
    assert H.batch_lr_ratio(16, 64, 0.5) == pytest.approx(2.0)
    assert H.default_batch_exponent("adamw", 0.32) == pytest.approx(0.18)
    assert H.default_batch_exponent("sgd", 0.32) == pytest.approx(0.68)
    assert H.default_batch_exponent("adam", 0.7) == 0.0          # never negative
    # tau = 1/(eta lambda S) kept: eta halves and S x 16 -> lambda x 1/(0.5 * 16) = 1/8
    assert H.decay_ratio("adamw", 0.5, 200, 3200) == pytest.approx(1 / 8)
    assert H.decay_ratio("adam", 0.5, 200, 3200) == 1.0           # coupled L2: a term of the loss
    assert H.decay_ratio("adamw", 0.5, 200, 3200, "fixed") == 1.0
    assert H.warmup_steps(10, 200, 3200) == 160
    assert H.warmup_steps(10, 200, 3200, "fixed") == 10
    assert H.warmup_steps(0, 200, 3200) == 0
    assert H.eps_ratio(16, 64) == pytest.approx(0.5)
    assert H.decay_timescale(0.01, 0.1, 200) == pytest.approx(5.0) and H.decay_timescale(0.01, 0, 9) == math.inf
    assert H.beta_at_batch(0.9, 16, 32, "half_life") == pytest.approx(0.81)
    assert H.beta_at_batch(0.9, 16, 32) == 0.9
    # Chinchilla-style horizon: 20 tokens x 1M params / (64 x 128 tokens per step)
    assert H.steps_for_tokens(20, 1_000_000, 64, 128) == math.ceil(20e6 / 8192)
    with pytest.raises(ValueError):
        H.horizon_lr_ratio(0, 10, 0.3)


def test_factors_compose_and_identity_at_proxy():
    p = H.Run(200, 16, 10)
    f = H.factors("adamw", p, H.Run(3200, 64), H.Rules(horizon_exponent=0.25, batch_exponent=0.5))
    assert f.horizon_lr == pytest.approx(0.5) and f.batch_lr == pytest.approx(2.0) and f.lr == pytest.approx(1.0)
    assert f.weight_decay == pytest.approx(1 / 16)       # lr ratio 1, 16x the steps
    assert f.warmup == 160 and f.eps == pytest.approx(0.5) and f.exponent_source == "recipe"
    same = H.factors("adamw", p, H.Run(200, 16))
    assert same.identity and same.lr == 1.0
    off = H.factors("adamw", p, H.Run(3200, 64), H.Rules(enabled=False))
    assert off.lr == 1.0 and off.weight_decay == 1.0 and off.warmup == 10 and off.exponent_source == "off"
    # measured beats default, the recipe beats measured
    assert H.factors("sgd", p, H.Run(400, 16), measured_horizon=0.1).horizon_exponent == 0.1
    assert H.factors("sgd", p, H.Run(400, 16)).horizon_exponent == H.DEFAULT_HORIZON_EXPONENT
    assert H.factors("sgd", p, H.Run(400, 16), H.Rules(horizon_exponent=0.5), measured_horizon=0.1).horizon_exponent == 0.5


def test_plan_at_proxy_run_is_todays_plan():
    r = _recipe(steps=48, batch_size=32)
    shapes = shapes_for(r, 32)
    hp = HParams.from_train(r.train)
    today = make_plan(shapes, hp, "adamw")
    same = make_plan(shapes, hp, "adamw", horizon=horizon_factors(r, 12, 8))
    for n, p in today.params.items():
        q = same.params[n]
        assert (p.lr, p.weight_decay, p.eps, p.init_std) == (q.lr, q.weight_decay, q.eps, q.init_std)
    f = horizon_factors(r, 48, 32)
    moved = make_plan(shapes, hp, "adamw", horizon=f)
    for n, p in today.params.items():
        q = moved.params[n]
        assert q.lr == pytest.approx(p.lr * f.lr)
        assert q.eps == pytest.approx(p.eps * f.eps)
        # decoupled decay: the per-step shrink lr x wd follows S0/S
        assert q.lr * q.weight_decay == pytest.approx(p.lr * p.weight_decay * 12 / 48)
        assert q.init_std == p.init_std            # the horizon never touches init
    assert moved.to_json()["horizon"]["lr"] == pytest.approx(f.lr)
    hp2 = at_horizon(hp, H.factors("adamw", H.Run(12, 8), H.Run(12, 16), H.Rules(betas="half_life")))
    assert hp2.beta1 == pytest.approx(0.81) and hp2.beta2 == pytest.approx(0.999 ** 2)


# ----------------------------------------------------------------------------------------------- the fit

def _surface(gamma: float, horizons, seeds: int, noise: float, rng: random.Random):
    """Loss curves over log2 LR whose optimum sits at c - gamma log2 T (plus seed noise)."""
    xs = [-9 + 0.5 * i for i in range(21)]
    losses = {}
    for h in horizons:
        centre = -3.0 - gamma * math.log2(h)
        for s in range(seeds):
            shift = rng.gauss(0, noise)
            losses[(h, s)] = [2.0 + 0.05 * (x - centre - shift) ** 2 for x in xs]
    return xs, losses


@pytest.mark.parametrize("gamma", [0.3, 0.1, -0.2])
def test_fit_recovers_a_known_exponent(gamma):
    rng = random.Random(1)
    xs, losses = _surface(gamma, [200, 400, 800, 1600], 3, 0.1, rng)
    f = fit_exponent([200, 400, 800, 1600], xs, losses)
    assert f.exponent == pytest.approx(gamma, abs=0.08)
    assert f.low <= gamma <= f.high
    assert f.used == [200, 400, 800, 1600] and not f.early


def test_fit_leaves_out_early_horizons_and_refuses_too_few():
    rng = random.Random(2)
    xs, losses = _surface(0.3, [100, 200, 400], 2, 0.05, rng)
    f = fit_exponent([100, 200, 400], xs, losses, early={100: True})
    assert f.used == [200, 400] and f.early == [100] and f.exponent == pytest.approx(0.3, abs=0.1)
    g = fit_exponent([100, 200, 400], xs, losses, early={100: True, 200: True})
    assert g.exponent is None and "need 2" in g.reason
    # an optimum at the grid's edge is not an optimum: left out too
    edge = {k: [2.0 + 0.01 * i for i in range(len(xs))] for k in losses if k[0] == 400}
    h = fit_exponent([100, 200, 400], xs, {**losses, **edge})
    assert 400 in h.early


def test_early_training_curve():
    fast = [5 * math.exp(-t / 30) + 1 for t in range(40)]        # still falling: early
    bent = [4 * math.exp(-t / 3) + 1 + 0.002 * (40 - t) for t in range(40)]   # past its descent
    assert is_early(fast) and not is_early(bent)


def test_transfer_gap():
    xs = [0, 1, 2, 3, 4]
    ref = [3, 2, 1, 2, 3]             # optimum at 2
    longer = [2, 1, 1.5, 2.5, 3]      # optimum near 1: at 2 it costs
    assert loss_at(xs, longer, 2) == 1.5
    g = transfer_gap(xs, ref, longer)
    assert g is not None and g > 0.3
    assert transfer_gap(xs, ref, ref) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------- recipe

@pytest.mark.parametrize("target, where", [
    ({"steps": 0}, "target.steps"),
    ({"steps": 10, "tokens_per_param": 20}, "target"),
    ({"batch_size": -1}, "target.batch_size"),
    ({"decay": "sometimes"}, "target.decay"),
    ({"stepz": 10}, "target.stepz"),
    ({"measure": {"horizons": [200]}}, "target.measure.horizons"),
    ({"horizon_exponent": 9}, "target.horizon_exponent"),
    ({"batch_exponent": -5}, "target.batch_exponent"),
    ({"tokens_per_param": -1}, "target.tokens_per_param"),
    ({"count": "some"}, "target.count"),
    ({"warmup": "sometimes"}, "target.warmup"),
    ({"eps": "cube"}, "target.eps"),
    ({"betas": "wild"}, "target.betas"),
    ({"rules": "maybe"}, "target.rules"),
    ({"measure": {"points": 2}}, "target.measure.points"),
    ({"measure": {"seeds": 0}}, "target.measure.seeds"),
    ({"measure": {"batch_sizes": [0, 16]}}, "target.measure.batch_sizes"),
    ({"measure": {"horizonz": [1, 2]}}, "target.measure.horizonz"),
])
def test_bad_target_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, target, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**TINY, "target": target}))
    res = CliRunner().invoke(app, ["scale", "r.yaml", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert where in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["scale", "r.yaml", "--batch-size", "0"], "--batch-size"),
    (["scale", "r.yaml", "--dry-run", "--batch-size", "-4"], "--batch-size"),
    (["sweep", "r.yaml", "--batch-sizes", "16"], "--batch-sizes"),
    (["sweep", "r.yaml", "--batch-sizes", "0,16"], "--batch-sizes"),
    (["sweep", "r.yaml", "--batch-sizes", "8,x"], "--batch-sizes"),
    (["sweep", "r.yaml", "--horizons", "12,abc"], "--horizons"),
    (["sweep", "r.yaml", "--horizons", "0,12"], "--horizons"),
    (["sweep", "r.yaml", "--batch-sizes", "8,16", "--equal", "tokens"], "--equal"),
    (["sweep", "r.yaml", "--horizons", "12,24", "--equal", "samples"], "--equal"),
    (["sweep", "r.yaml", "--horizons", "12,24", "--batch-sizes", "8,16"], "--batch-sizes"),
    (["sweep", "r.yaml", "--horizons", "12,24", "--width", "0"], "--width"),
])
def test_bad_horizon_flags_are_one_line_exit_2_nothing_written(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**TINY, "target": {"steps": 24}}))
    res = CliRunner().invoke(app, [*args, "--device", "cpu"] if args[0] == "scale" else args)
    one_line(res, 2, needle)
    assert not (tmp_path / "runs").exists()


def test_target_run_from_tokens_per_param():
    r = _recipe(tokens_per_param=2, batch_size=4)
    steps, batch = target_run(r, 32)
    n = sum(math.prod(p.shape) for p in shapes_for(r, 32).params.values() if p.layout != "embedding")
    assert batch == 4 and steps == math.ceil(2 * n / (4 * 1))
    assert target_run(r, 32, steps=7, batch=2) == (7, 2)      # flags win
    assert target_run(_recipe(), 32) == (12, 8)               # no target: the proxy's run


# ----------------------------------------------------------------------------------------------- commands

def test_scale_applies_the_rules_and_records_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**TINY, "target": {"steps": 24, "batch_size": 16,
                                                                       "horizon_exponent": 0.5}}))
    res = CliRunner().invoke(app, ["scale", "r.yaml", "--device", "cpu", "--width", "16"])
    assert res.exit_code == 0, res.output
    assert "horizon" in res.output and "12 -> 24 steps" in res.output
    assert "barely measured" in res.output        # lr 0.01 x wd 0.1 x 12 steps: tau = 83 runs
    run = tmp_path / "runs" / "tiny-h" / "scale-16"
    plan = json.loads((run / "plan.json").read_text())
    f = plan["horizon"]
    assert f["horizon_lr"] == pytest.approx(2 ** -0.5) and f["warmup"] == 4
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 24 and s["batch_size"] == 16
    lrs = {p["name"]: p["lr"] for p in plan["params"]}
    base = {p.name: p.lr for p in make_plan(shapes_for(_recipe(), 16, 16), HParams.from_train(_recipe().train),
                                            "adamw").params.values()}
    for n in base:
        assert lrs[n] == pytest.approx(base[n] * f["lr"])
    # the dry run shows the same factors
    dry = CliRunner().invoke(app, ["scale", "r.yaml", "--dry-run", "--width", "16"])
    assert dry.exit_code == 0, dry.output
    assert "h0.707" in dry.output and "12 -> 24 steps" in dry.output


def test_transfer_check_compares_longer_targets():
    file = {"best_value": 3.0, "steps": 100, "batch_size": 16}
    assert transfer_check(2.5, file, 400, 64)["status"] == "ok"
    assert transfer_check(3.2, file, 400, 64)["status"] == "failed"
    assert transfer_check(2.5, file, 50, 16)["status"] == "skipped"        # fewer samples: not comparable
    assert transfer_check(2.5, {"best_value": 3.0}, 100)["status"] == "skipped"


def test_sweep_horizons_both_arms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**TINY, "target": {"horizon_exponent": 0.5}}))
    res = CliRunner().invoke(app, ["sweep", "r.yaml", "--horizons", "12,24", "--lrs", "0.003,0.01,0.03",
                                   "--device", "cpu", "--json", "h.json"])
    assert res.exit_code == 3, res.output          # one seed: the transfer verdict is inconclusive (exit 3)
    d = json.loads((tmp_path / "h.json").read_text())
    assert d["axis"] == "horizon" and set(d["drift_octaves"]) == {"mup", "sp"}
    assert "longer_is_better" in d and set(d["transfer_gap_pct"]["mup"]) == {"12", "24"}
    # at the proxy's horizon both arms are one model; at 24 the rule moved the LR
    m, s = d["results"]["mup"], d["results"]["sp"]
    assert m["12"]["losses"] == s["12"]["losses"] and m["24"]["losses"] != s["24"]["losses"]
    bad = CliRunner().invoke(app, ["sweep", "r.yaml", "--horizons", "12", "--device", "cpu"])
    assert bad.exit_code == 2 and "--horizons" in bad.output
    bad = CliRunner().invoke(app, ["sweep", "r.yaml", "--horizons", "12,24", "--widths", "16,32"])
    assert bad.exit_code == 2


def test_sweep_batch_sizes_equal_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(TINY))
    res = CliRunner().invoke(app, ["sweep", "r.yaml", "--batch-sizes", "8,16", "--equal", "samples",
                                   "--lrs", "0.01,0.03", "--device", "cpu", "--json", "b.json"])
    assert res.exit_code == 3, res.output          # one seed: the transfer verdict is inconclusive (exit 3)
    d = json.loads((tmp_path / "b.json").read_text())
    assert d["axis"] == "batch" and d["equal"] == "samples" and "larger_batch_not_worse" in d


def test_tune_measures_the_exponent_and_scale_uses_it(tmp_path, monkeypatch):
    """target.measure: tune writes a horizon: section (or says why not) with its cost; scale's factors
    then come from it ("measured"), unless the fit was refused."""
    monkeypatch.chdir(tmp_path)
    rec = {**TINY, "target": {"steps": 24, "measure": {"horizons": [12, 24], "points": 4, "seeds": 1}},
           "search": {"trials": 2, "params": {"lr": {"low": 0.005, "high": 0.02, "log": True}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    res = CliRunner().invoke(app, ["tune", "r.yaml"])
    assert res.exit_code == 0, res.output
    assert "measurement cost" in res.output
    hp = yaml.safe_load((tmp_path / "runs" / "tiny-h" / "hparams.yaml").read_text())
    h = hp["horizon"]
    assert hp["batch_size"] == 8 and h["seconds"] > 0 and h["search_seconds"] > 0
    assert set(h["horizon_fit"]["optima"]) <= {"12", "24"}
    dry = CliRunner().invoke(app, ["scale", "r.yaml", "--dry-run", "--width", "16"])
    assert dry.exit_code == 0, dry.output
    if "exponent" in h:
        assert "measured on the proxy" in dry.output
    else:
        assert h["horizon_fit"]["reason"] and "the default" in dry.output
