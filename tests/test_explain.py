"""`mutransfer scale RECIPE --dry-run [--width W] [--json PATH]`: the plan as a table and as JSON, with
the target's cost; nothing built for real, nothing trained, nothing written but the JSON."""
import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from mutransfer import HParams, make_plan
from mutransfer.cli import app
from mutransfer.engine.shapes import infer_shapes
from mutransfer.models import gpt

ARGS = {"layers": 2, "heads": 4, "vocab": 96, "seq_len": 16}
RECIPE = {
    "name": "explain-test",
    "model": {"factory": "builtin:gpt", "args": ARGS},
    "data": {"factory": "builtin:pysource", "args": {"seq_len": 16, "max_bytes": 200000}},
    "widths": {"proxy": 32, "target": 128},
    "train": {"optimizer": "adamw", "lr": 2e-3, "steps": 10, "batch_size": 8, "weight_decay": 0.1},
}
FIELDS = {"name": str, "shape": list, "base_shape": list, "role": str, "fan_in": int, "fan_out": int,
          "init_std": float, "lr": float, "weight_decay": float, "eps": (float, type(None))}


def dry_run(tmp_path, monkeypatch, recipe=RECIPE, *flags):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["scale", "r.yaml", "--dry-run", "--json", "plan.json", *flags])
    assert res.exit_code == 0, res.output
    return res.stdout, json.loads((tmp_path / "plan.json").read_text())


def test_json_schema_and_values(tmp_path, monkeypatch):
    out, d = dry_run(tmp_path, monkeypatch)
    assert (d["width"], d["base_width"]) == (128, 32)           # --width defaults to the target
    plan = make_plan(infer_shapes(gpt, ARGS, 32, 128), HParams(lr=2e-3, weight_decay=0.1), "adamw")
    assert [r["name"] for r in d["params"]] == list(plan.params)
    for row in d["params"]:
        for k, t in FIELDS.items():
            assert isinstance(row[k], t), (k, row[k])
        p = plan.params[row["name"]]
        assert row["role"] in ("input", "hidden", "output", "vector", "fixed")
        assert tuple(row["shape"]) == p.shape and tuple(row["base_shape"]) == p.base_shape
        assert (row["init_std"], row["lr"], row["weight_decay"], row["eps"]) == (p.init_std, p.lr, p.weight_decay, p.eps)
        if row["name"].endswith("bias") or ".ln" in row["name"] or row["name"].startswith("ln"):
            assert row["init_std"] == 0                          # constant inits
        assert row["lr"] * row["weight_decay"] == pytest.approx(2e-3 * 0.1)
    # the cost of the target
    n = sum(math.prod(r["shape"]) for r in d["params"])
    assert d["cost"]["params"] == n == sum(p.numel() for p in gpt(width=128, **ARGS).parameters())
    assert d["cost"]["memory_bytes"] == n * 4 * 4                # weights, grads, Adam's two moments
    tokens = 8 * 16
    assert 0.5 < d["cost"]["flops_per_step"] / (6 * n * tokens) < 3   # ~6 N T for a small transformer
    # the table: one row per parameter, the cost line
    for name in ("tok.weight", "blocks.1.fc_out.weight", "head.weight"):
        assert name in out
    assert "target" in out and f"{n:,} parameters" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "r.yaml"]   # nothing else written


def test_width_flag_sgd_and_departure_note(tmp_path, monkeypatch):
    r = json.loads(json.dumps(RECIPE))
    r["train"]["optimizer"] = "sgd"
    out, d = dry_run(tmp_path, monkeypatch, r, "--width", "64")
    assert d["width"] == 64
    assert all(row["eps"] is None for row in d["params"])
    assert d["cost"]["memory_bytes"] == d["cost"]["params"] * 4 * 2    # no momentum: no state
    head = next(row for row in d["params"] if row["name"] == "head.weight")
    assert "not muP's" in head["note"]                            # vocab 96 > proxy width 32
    assert "not muP's 1/fan_in" in out


def test_flops_grow_with_width(tmp_path, monkeypatch):
    _, small = dry_run(tmp_path, monkeypatch, RECIPE, "--width", "64")
    _, big = dry_run(tmp_path, monkeypatch, RECIPE, "--width", "256")
    assert big["cost"]["flops_per_step"] > 4 * small["cost"]["flops_per_step"]


@pytest.mark.parametrize("width", ["0", "-5"])
def test_bad_width_flag(tmp_path, monkeypatch, width):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    res = CliRunner().invoke(app, ["scale", "r.yaml", "--dry-run", "--width", width, "--json", "p.json"])
    assert res.exit_code == 2 and "--width" in res.stderr and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("name", ["quickstart", "mlp-pysource", "gpt-pysource"])
def test_shipped_recipes_explain(name):
    from pathlib import Path

    from mutransfer.report.explain import explain
    from mutransfer.run.recipe import load_recipe

    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
    plan, shapes, cost = explain(r, r.widths.target)
    assert plan.width == r.widths.target and shapes.unknown == []
    assert cost.flops_per_step and cost.flops_per_step > 0, cost.flops_error
    assert {p.role for p in plan.params.values()} >= {"input", "hidden", "output"}
