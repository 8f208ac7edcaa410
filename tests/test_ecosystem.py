"""What a run leaves for the user's stack: load() and export of the trained target (tied and untied),
a dry run that shows the plan the run will use, plain progress lines when piped, --version. (The
Python examples of README.md and docs/ run in tests/test_docs.py.)"""
import json
import os
import re
import subprocess
import sys
import sys as _sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import mutransfer
from mutransfer.cli import app
from mutransfer.models import gpt
from mutransfer.run import experiment
from mutransfer.run.recipe import load_recipe
from mutransfer.run.train import evaluate

_sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
from helpers import cli_in  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_recipe(tmp: Path, tied: bool) -> Path:
    r = {"name": f"eco-{'tied' if tied else 'untied'}",
         "model": {"factory": "builtin:gpt", "args": {"layers": 1, "heads": 2, "vocab": 256, "seq_len": 16, "tied": tied}},
         "data": {"factory": "builtin:pysource", "args": {"seq_len": 16}},
         "widths": {"proxy": 16, "target": 32},
         "train": {"optimizer": "adamw", "lr": 1e-2, "steps": 12, "batch_size": 4, "eval_batches": 2, "log_every": 4},
         "search": {"trials": 2, "sampler_seed": 0, "params": {"lr": {"low": 1e-3, "high": 3e-2, "log": True}}}}
    p = tmp / f"{r['name']}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


cli = cli_in

@pytest.mark.parametrize("tied", [True, False])
def test_load_and_export_reproduce_the_runs_validation_loss(tmp_path, tied):
    r = write_recipe(tmp_path, tied)
    assert cli(tmp_path, "scale", r).exit_code == 0
    run = tmp_path / "runs" / r.stem / "scale-32"
    summary = json.loads((run / "summary.json").read_text())
    recipe = load_recipe(r)
    val = experiment.val_batches(recipe, recipe.train.eval_batches, seed=recipe.train.seed)
    model = mutransfer.load(run)
    assert not model.training
    assert evaluate(model, val, "cross_entropy", "cpu", False) == pytest.approx(summary["val_loss"], rel=1e-6)
    res = cli(tmp_path, "export", run, "exported")
    assert res.exit_code == 0, res.output
    assert ("exported untied" in res.output) == tied
    cfg = json.loads((tmp_path / "exported" / "config.json").read_text())
    plain = gpt(width=cfg["width"], **cfg["args"])          # no mutransfer involved from here
    plain.load_state_dict(torch.load(tmp_path / "exported" / "model.pt"))
    plain.eval()
    assert evaluate(plain, val, "cross_entropy", "cpu", False) == pytest.approx(summary["val_loss"], rel=1e-5)


def test_load_names_what_is_wrong(tmp_path):
    with pytest.raises(mutransfer.UserError, match="not a scale run folder"):
        mutransfer.load(tmp_path)


def test_dry_run_shows_the_plan_the_run_uses(tmp_path):
    r = write_recipe(tmp_path, False)
    assert cli(tmp_path, "tune", r).exit_code == 0
    res = cli(tmp_path, "scale", r, "--dry-run", "--json", "dry.json")
    assert res.exit_code == 0 and "tuned values from runs/eco-untied/hparams.yaml" in res.output
    assert cli(tmp_path, "scale", r).exit_code == 0
    dry = json.loads((tmp_path / "dry.json").read_text())
    ran = json.loads((tmp_path / "runs" / "eco-untied" / "scale-32" / "plan.json").read_text())
    assert [(p["name"], p["lr"], p["init_std"]) for p in dry["params"]] == \
           [(p["name"], p["lr"], p["init_std"]) for p in ran["params"]]


def test_piped_scale_prints_a_line_per_log_interval(tmp_path):
    r = write_recipe(tmp_path, False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "mutransfer.cli", "scale", str(r)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["4/12", "8/12", "12/12"], out.stdout
    assert all("loss" in ln and "eta" in ln for ln in lines)


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and re.fullmatch(r"mutransfer \d+\.\d+\.\d+\S*", res.output.strip())


def test_log_tensorboard_wandb_csv_land_inside_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = write_recipe(tmp_path, False)
    res = cli(tmp_path, "scale", r, "--log", "tensorboard", "--log", "wandb", "--log", "csv")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "eco-untied" / "scale-32"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*"))
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,key,value" and any(",train/loss," in x for x in rows) and any(",val/loss," in x for x in rows)
    res = cli(tmp_path, "tune", r, "--log", "csv")
    assert res.exit_code == 0, res.output
    assert ",trial/best_val_loss," in (tmp_path / "runs" / "eco-untied" / "metrics.csv").read_text()
    res = cli(tmp_path, "scale", r, "--log", "nope", "--out", "other")
    assert res.exit_code == 2 and "--log" in res.output and not (tmp_path / "other").exists()


def test_python_tune_api_with_a_user_loop_resumes(tmp_path):
    import optuna

    from mutransfer.data import vectors
    from mutransfer.models import mlp

    calls, starts = [], []

    def train_fn(model, optimizer, report):
        starts.append(1)
        it = vectors(batch_size=16, seed=0, dim=8, classes=4)
        loss = None
        for step in range(20):
            x, y = next(it)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 9:
                report(float(loss), step)
        calls.append(float(loss))
        return float(loss)

    url = f"sqlite:///{tmp_path / 'api.db'}"
    space = {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}
    best = mutransfer.tune(mlp, train_fn, space, width=16, trials=3, storage=url, study_name="api",
                           args={"in_dim": 8, "out_dim": 4}, sampler_seed=0)
    assert best["proxy_width"] == 16 and 1e-3 <= best["hparams"]["lr"] <= 1e-1 and best["trials"] == 3
    assert best["best_value"] == min(calls)
    again = mutransfer.tune(mlp, train_fn, space, width=16, trials=4, storage=url, study_name="api",
                            args={"in_dim": 8, "out_dim": 4})
    assert again["trials"] == 4 and len(starts) == 4         # resumed: one more trial (maybe pruned), not four
    with pytest.raises(mutransfer.UserError, match="space.nope"):
        mutransfer.tune(mlp, train_fn, {"nope": {"low": 1, "high": 2}}, width=16, trials=1, storage=url)
    assert optuna.load_study(study_name="api", storage=url)


def test_piped_tune_sweep_and_coord_check_print_plain_progress_lines(tmp_path):
    r = write_recipe(tmp_path, False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "mutransfer.cli", *map(str, args)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        return out.stdout + out.stderr

    assert [ln.split()[2] for ln in run("tune", r).splitlines() if ln.startswith("tune: trials")] == ["1/2", "2/2"]
    lines = [ln for ln in run("sweep", r, "--widths", "16,32", "--lrs", "0.01", "--steps", "2",
                              "--parametrization", "mup").splitlines() if ln.startswith("sweep: points")]
    assert len(lines) == 2 and all("eta" in ln for ln in lines)
    lines = [ln for ln in run("coord-check", r, "--widths", "16,32", "--steps", "1", "--seeds", "1").splitlines()
             if ln.startswith("coord-check: runs")]
    assert len(lines) == 2
