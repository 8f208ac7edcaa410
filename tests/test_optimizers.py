"""Optimizers named by class (engine/optimizers.py): Lion (written in tests/optim_zoo.py, sign update:
Adam's rule), torch's Adafactor (relative step: Adam's LR ratio over the init ratio) and a project's own
fused Muon + AdamW (orthogonal) get the plan's per-parameter groups, run tune -> scale, pass the
coordinate check under muP, and a class path that does not exist is one line naming train.optimizer."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mutransfer.engine import optimizers, spectral
from mutransfer.engine.hparams import HParams
from mutransfer.engine.plan import make_plan
from mutransfer.run import coord, experiment
from mutransfer.run.recipe import parse_recipe

from helpers import cli_in

sys.path.insert(0, str(Path(__file__).parent))    # optim_zoo

VEC = {"factory": "builtin:vectors", "args": {"dim": 32, "classes": 10}}


def _recipe(optimizer: str, lr: float = 1e-3, **train) -> dict:
    return {"name": "opt", "model": {"factory": "builtin:mlp", "args": {"in_dim": 32, "out_dim": 10}}, "data": VEC,
            "widths": {"proxy": 32, "target": 128},
            "train": {"optimizer": optimizer, "lr": lr, "steps": 6, "batch_size": 8, "eval_batches": 1,
                      "weight_decay": 0.1, **train},
            "search": {"trials": 2, "sampler_seed": 0, "heartbeat": 1,
                       "params": {"lr": {"low": lr / 3, "high": lr * 3, "log": True}}}}


def test_update_families_map_to_the_rules():
    assert spectral.update_family("sign") == spectral.update_family("adam") == spectral.ADAMW
    assert spectral.update_family("orthogonal") == spectral.MUON and spectral.update_family("sgd") == spectral.SGD
    assert optimizers.kind_of(torch.optim.Adafactor) == "relative" and optimizers.kind_of(torch.optim.NAdam) == "adam"


def test_lion_gets_adams_plan_and_its_groups_without_eps():
    r = parse_recipe(_recipe("optim_zoo:Lion"))
    ref = parse_recipe(_recipe("adamw"))
    lion, adamw = experiment.build(r, 128), experiment.build(ref, 128)
    assert type(lion.optimizer).__name__ == "Lion"
    for name, p in adamw.plan.params.items():
        assert lion.plan.params[name].lr == p.lr and lion.plan.params[name].weight_decay == p.weight_decay
    lrs = {n: g["lr"] for g in lion.optimizer.param_groups for n in g["names"]}
    assert lrs["hidden.0.weight"] == pytest.approx(1e-3 * 32 / 128)           # Adam's 1/fan_in
    assert all("eps" not in g for g in lion.optimizer.param_groups)           # Lion takes no eps
    assert lion.optimizer.param_groups[0]["betas"] == (0.9, 0.999)            # the recipe's betas


def test_adafactor_lr_follows_the_relative_step_rule():
    r = parse_recipe(_recipe("Adafactor", 1e-2))
    pm = experiment.build(r, 128)
    hid = pm.plan.params["hidden.0.weight"]
    adam_ratio, std_ratio = 32 / 128, math.sqrt(32 / 128)
    assert hid.lr == pytest.approx(1e-2 * adam_ratio / std_ratio)
    assert hid.lr * hid.weight_decay == pytest.approx(1e-2 * 0.1)             # independent decay
    assert isinstance(pm.optimizer, torch.optim.Adafactor)
    assert all(g["eps"] == (None, 1e-3) for g in pm.optimizer.param_groups)   # its eps is a pair: its own default


def test_own_orthogonal_class_gets_muon_groups_with_the_effective_step():
    r = parse_recipe(_recipe("optim_zoo:FusedMuonAdam", 2e-2, optimizer_kind="orthogonal"))
    pm = experiment.build(r, 128)
    assert pm.optimizer.seen_muon == ["hidden.0.weight"]
    g = next(g for g in pm.optimizer.param_groups if g["use_muon"])
    # the spectral step sqrt(fan_out/fan_in) relative to the proxy: square hidden matrix -> unchanged
    assert g["lr"] == pytest.approx(2e-2)
    plan = make_plan(experiment.shapes_for(r, 128), HParams(lr=2e-2), "optim_zoo:FusedMuonAdam")
    assert plan.params["hidden.0.weight"].optimizer == "muon" and plan.params["out.weight"].optimizer == "adamw"


@pytest.mark.parametrize("optimizer,lr", [("optim_zoo:Lion", 1e-3), ("Adafactor", 1e-2)])
def test_tune_then_scale(tmp_path, optimizer, lr):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_recipe(optimizer, lr)))
    res = cli_in(tmp_path, "tune", p, "--device", "cpu", "--trials", "2", "--parallel-trials", "2")
    assert res.exit_code == 0, res.output
    hp = yaml.safe_load((tmp_path / "runs" / "opt" / "hparams.yaml").read_text())
    assert hp["optimizer"] == optimizer
    res = cli_in(tmp_path, "scale", p, "--device", "cpu", "--checkpoint-every", "3")
    assert res.exit_code in (0, 1), res.output            # 1: the 6-step transfer check may say worse
    assert "summary" in res.output and "Traceback" not in res.output
    out = tmp_path / "runs" / "opt" / "scale-128"
    assert sorted(x.name for x in (out / "checkpoints").iterdir()) == ["step-00000003.pt", "step-00000006.pt"]
    # resumed from step 3 (as if killed): the class's own state_dict restores it exactly
    want = (out / "metrics.jsonl").read_text().splitlines()[-1]
    (out / "checkpoints" / "step-00000006.pt").unlink()
    (out / "summary.json").unlink()
    res = cli_in(tmp_path, "scale", p, "--device", "cpu", "--checkpoint-every", "3", "--resume")
    assert res.exit_code in (0, 1) and "resuming from" in res.output, res.output
    got = (out / "metrics.jsonl").read_text().splitlines()[-1]
    assert yaml.safe_load(got)["loss"] == yaml.safe_load(want)["loss"]


@pytest.mark.parametrize("optimizer,lr,kind", [("optim_zoo:Lion", 1e-3, None), ("Adafactor", 1e-2, None)])
def test_coordinate_check_passes_mup(optimizer, lr, kind):
    r = parse_recipe(_recipe(optimizer, lr, weight_decay=0.0))
    res = coord.run(r, coord.resolve(r, widths=[32, 64, 128, 256], steps=5, seeds=1, lr=10 * lr))
    assert res.verdict == "ok", [(x.name, x.statistic, round(x.slope, 2)) for x in res.worst_first[:3]]


def test_lion_under_sp_is_flagged():
    r = parse_recipe(_recipe("optim_zoo:Lion", 1e-3, weight_decay=0.0))
    res = coord.run(r, coord.resolve(r, widths=[32, 64, 128, 256], steps=5, seeds=1, lr=1e-2, parametrization="sp"))
    assert res.verdict == "blowup"


@pytest.mark.parametrize("spec,field,needle", [
    ("p23_nowhere.mod:Lion", "train.optimizer", "p23_nowhere"),
    ("optim_zoo:Nope", "train.optimizer", "Nope"),
    ("Lamb", "train.optimizer", "unknown optimizer"),
    ("optim_zoo:NotAnOptimizerKind", "train.optimizer_kind", "update family"),
])
def test_a_bad_class_path_is_one_line_exit_2(tmp_path, spec, field, needle):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_recipe(spec)))
    res = cli_in(tmp_path, "scale", p, "--dry-run")
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and field in line and needle in line and "Traceback" not in line


def test_kind_and_args_do_not_apply_to_the_builtins(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_recipe("adamw", optimizer_kind="sign")))
    res = cli_in(tmp_path, "scale", p, "--dry-run")
    assert res.exit_code == 2 and "train.optimizer_kind" in res.output


def test_stacked_trials_with_a_named_class_match_trials_one_at_a_time(tmp_path):
    """Each slot's own Lion over views of the stack (refilled: 3 trials, 2 at a time) gives the losses
    of trials trained alone."""
    import optuna

    d = _recipe("optim_zoo:Lion", 1e-3)
    d["search"].update(trials=3, sampler="random", pruner="none")
    d["train"]["steps"] = 3
    values = {}
    for n in (1, 2):
        folder = tmp_path / f"p{n}"
        folder.mkdir()
        (folder / "r.yaml").write_text(yaml.safe_dump(d))
        res = cli_in(folder, "tune", "r.yaml", "--device", "cpu", "--parallel-trials", str(n))
        assert res.exit_code == 0, res.output
        study = optuna.load_study(study_name="opt", storage=f"sqlite:///{folder}/runs/opt/study.db")
        values[n] = sorted((round(t.params["lr"], 12), t.value) for t in study.trials)
    assert [v[0] for v in values[1]] == [v[0] for v in values[2]]
    for (_, a), (_, b) in zip(values[1], values[2]):
        assert a == pytest.approx(b, rel=1e-4)
