"""Batched trials (issue 14): several trials stacked in one TrialBatch train exactly as each alone;
the batched optimizer is torch's; per-trial pruning and divergence inside a group; models vmap
refuses fall back (with the reason); tune --parallel-trials end to end."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from mutransfer.engine.hparams import HParams
from mutransfer.run import experiment
from mutransfer.run.batched_trials import build_batch, probe, run_group
from mutransfer.run.recipe import parse_recipe
from mutransfer.run.train import train
from mutransfer.run.trial_batch import SlotData, make_optimizer

from helpers import cli_in  # tests/ is on sys.path

sys.path.insert(0, str(Path(__file__).parent))   # batched_models, for "batched_models:NAME" factories

STEPS = 20


def gpt_recipe(optimizer="adamw", tied=False, seeds=1, steps=STEPS, **train_extra):
    return parse_recipe({
        "name": "b", "model": {"factory": "builtin:gpt",
                               "args": {"layers": 2, "heads": 2, "vocab": 256, "seq_len": 16, "tied": tied}},
        "data": {"factory": "builtin:pysource", "args": {"seq_len": 16}},
        "widths": {"proxy": 32, "target": 64},
        "train": {"optimizer": optimizer, "lr": 3e-3, "steps": steps, "batch_size": 4, "eval_batches": 2,
                  "momentum": 0.9 if optimizer == "sgd" else 0.0, **train_extra},
        "search": {"trials": 4, "seeds": seeds, "sampler_seed": 0,
                   "params": {"lr": {"low": 1e-3, "high": 3e-2, "log": True}}},
    })


VALUES = [{"lr": 3e-3, "output_init": 1.0}, {"lr": 1e-2, "output_init": 0.3},
          {"lr": 1e-3, "output_init": 3.0, "weight_decay": 0.1}, {"lr": 2e-2, "output_init": 0.5, "beta2": 0.99}]


def _slots(r, values, seeds, vectorise=True, steps=STEPS):
    """Final training loss and validation loss of every slot, trained together."""
    base = HParams.from_train(r.train)
    hps = [base.with_values(v) for v in values]
    batch = build_batch(r, 32, hps, seeds, "cpu", vectorise)
    opt = make_optimizer(batch, r.train.optimizer)
    cfg = experiment.train_config(r, steps=steps, eval_every=10)
    val = experiment.val_batches(r, 2, seed=0)
    st = train(batch, opt, SlotData(batch, lambda s: experiment.data_stream(r, "train", s)), cfg, val)
    return [(s.loss, s.val_loss) for s in st.slots]


def _close(a, b, rel=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert math.isclose(u, v, rel_tol=rel, abs_tol=1e-7), (a, b)


@pytest.mark.parametrize("optimizer,tied", [("adamw", False), ("adam", True), ("sgd", False), ("muon", False)])
def test_a_group_trains_every_trial_as_it_trains_alone(optimizer, tied):
    """Four trials (different LR, readout init, decay, beta2; two seeds) for 20 steps: together, under
    vmap, and one at a time give the same losses within 1e-5 relative."""
    r = gpt_recipe(optimizer, tied=tied)
    seeds = [0, 0, 1, 1]
    together = _slots(r, VALUES, seeds)
    alone = [_slots(r, [v], [s])[0] for v, s in zip(VALUES, seeds)]
    # Muon orthogonalises in bf16 (as torch.optim.Muon): a batched matmul may round an element one bf16
    # ulp (2^-8) away from a single one, depending on the CPU's kernels; here the losses agree to ~1e-4
    # after 20 steps; 1e-3 leaves room for other machines
    _close(together, alone, rel=1e-3 if optimizer == "muon" else 1e-5)
    # and the trials really differ (a stack that mixed them up could not pass the line above by luck)
    assert len({round(x[0], 4) for x in together}) == 4


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_one_slot_is_torchs_optimizer(optimizer):
    """The batched optimizer with one slot follows torch.optim's AdamW / Adam / SGD through train()."""
    r = gpt_recipe(optimizer)
    hp = HParams.from_train(r.train).with_values({"lr": 1e-2, "weight_decay": 0.1, "output_init": 0.5})
    ours = _slots(r, [{"lr": 1e-2, "weight_decay": 0.1, "output_init": 0.5}], [0])[0]
    p = experiment.build(r, 32, hp, seed=0, base_width=32)
    st = train(p.model, p.optimizer, experiment.data_stream(r, "train", 0),
               experiment.train_config(r, steps=STEPS, eval_every=10), experiment.val_batches(r, 2, seed=0))
    _close([ours], [(st.loss, st.val_loss)], rel=2e-5)


def test_without_vmap_the_same_numbers():
    r = gpt_recipe("adamw")
    _close(_slots(r, VALUES[:3], [0, 1, 0], vectorise=True), _slots(r, VALUES[:3], [0, 1, 0], vectorise=False))


def test_grad_clip_is_per_slot():
    r = gpt_recipe("adamw", grad_clip=0.05)
    together = _slots(r, VALUES[:2], [0, 0])
    alone = [_slots(r, [v], [0])[0] for v in VALUES[:2]]
    _close(together, alone)


class FakeTrial:
    """A trial the test controls: it records reports and is pruned when told to."""

    def __init__(self, prune_at=None):
        self.prune_at, self.reports = prune_at, []

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.prune_at is not None and self.reports[-1][0] >= self.prune_at


def test_pruning_and_divergence_are_per_trial_inside_a_group():
    r = gpt_recipe("adamw", steps=30)
    r = r.model_copy(update={"search": r.search.model_copy(update={"report_every": 10, "seeds": 2})})
    base = HParams.from_train(r.train)
    hps = [base.with_values({"lr": 3e-3}), base.with_values({"lr": 1e3}), base.with_values({"lr": 1e-2})]
    trials = [FakeTrial(), FakeTrial(), FakeTrial(prune_at=10)]
    val = experiment.val_batches(r, 2, seed=0)
    order = []
    out = run_group(r, 32, "cpu", trials, hps, val, done=lambda i, o: order.append((i, o.state)))
    ok, bad, pruned = out
    # the diverged and the pruned trial are handed over as they end, the full-length one last
    assert sorted(order[:2]) == [(1, "complete"), (2, "pruned")] and order[2] == (0, "complete")
    assert ok.state == "complete" and not ok.attrs["diverged"] and ok.attrs["steps_run"] == 60
    assert len(ok.attrs["seed_values"]) == 2 and ok.value == pytest.approx(sum(ok.attrs["seed_values"]) / 2)
    assert bad.state == "complete" and bad.attrs["diverged"] and bad.value > ok.value
    assert bad.attrs["steps_run"] < 60
    assert pruned.state == "pruned" and pruned.attrs["steps_run"] == 20     # 2 seeds x 10 steps, then gone
    assert [s for s, _ in trials[0].reports] == [10, 20, 30]
    # the trial left alone in the stack ended where it would have ended on its own
    solo = run_group(r, 32, "cpu", [FakeTrial()], [hps[0]], val)[0]
    assert solo.value == pytest.approx(ok.value, rel=1e-5)


def test_a_model_vmap_refuses_falls_back_with_the_reason(tmp_path):
    rec = {"name": "itemy", "model": {"factory": "batched_models:item_control_flow", "args": {"in_dim": 8}},
           "data": {"factory": "builtin:vectors", "args": {"dim": 8, "classes": 4}},
           "widths": {"proxy": 16, "target": 32},
           "train": {"optimizer": "adamw", "lr": 1e-2, "steps": 6, "batch_size": 8, "eval_batches": 1},
           "search": {"trials": 3, "sampler_seed": 0, "params": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}}}
    r = parse_recipe(rec)
    why = probe(r, 16, "cpu")
    assert why is not None and ".item()" in why, why
    assert probe(gpt_recipe(), 32, "cpu") is None
    rec_eval = {**rec, "model": {"factory": "batched_models:eval_item", "args": {"in_dim": 8}}}
    assert ".item()" in (probe(parse_recipe(rec_eval), 16, "cpu") or "")     # eval mode is probed too
    (tmp_path / "itemy.yaml").write_text(yaml.safe_dump(rec))
    res = cli_in(tmp_path, "tune", "itemy.yaml", "--parallel-trials", "3", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "cannot be vectorised" in res.output
    st = optuna.load_study(study_name="itemy", storage=f"sqlite:///{tmp_path}/runs/itemy/study.db")
    assert sum(t.state == TrialState.COMPLETE for t in st.trials) == 3
    assert {t.user_attrs["parallel_trials"] for t in st.trials} == {1}


def _qs(tmp_path, trials=6, **search):
    r = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "quickstart.yaml").read_text())
    r["train"].update(steps=24, batch_size=4, eval_batches=2)
    r["model"]["args"]["layers"] = 1
    r["widths"]["proxy"] = 32
    r["search"].update(trials=trials, sampler_seed=0, **search)
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(r))
    return tmp_path / "q.yaml"


def test_tune_parallel_trials_end_to_end(tmp_path):
    _qs(tmp_path, trials=6)
    res = cli_in(tmp_path, "tune", "q.yaml", "--parallel-trials", "4", "--device", "cpu", "--threads", "1")
    assert res.exit_code == 0, res.output
    st = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path}/runs/quickstart/study.db")
    finished = [t for t in st.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6 and len({t.number for t in st.trials}) == len(st.trials)
    # one group of 4 places: trials 4 and 5 were trained in places that trials of the first four freed
    assert [t.user_attrs["parallel_trials"] for t in finished] == [4] * 6
    assert {t.user_attrs["device"] for t in finished} == {"cpu"}
    assert {t.user_attrs["precision"] for t in finished} == {"fp32"}
    assert st.user_attrs["devices"] == ["cpu"] and st.user_attrs["precisions"] == ["fp32"]
    assert (tmp_path / "runs" / "quickstart" / "hparams.yaml").exists()
    # resume: asks only what is missing
    res = cli_in(tmp_path, "tune", "q.yaml", "--parallel-trials", "4", "--trials", "7", "--device", "cpu")
    assert res.exit_code == 0, res.output
    st = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path}/runs/quickstart/study.db")
    assert len(st.trials) == 7


def test_hyperband_prunes_inside_groups(tmp_path):
    _qs(tmp_path, trials=12, pruner="hyperband", report_every=4)
    res = cli_in(tmp_path, "tune", "q.yaml", "--parallel-trials", "4", "--device", "cpu")
    assert res.exit_code == 0, res.output
    st = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path}/runs/quickstart/study.db")
    pruned = [t for t in st.trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.state) for t in st.trials]
    assert all(t.user_attrs["steps_run"] < 24 for t in pruned)


@pytest.mark.parametrize("flag,value", [("--parallel-trials", "0"), ("--threads", "0")])
def test_bad_counts_are_one_line(tmp_path, flag, value):
    _qs(tmp_path)
    res = cli_in(tmp_path, "tune", "q.yaml", flag, value, "--device", "cpu")
    assert res.exit_code == 2 and flag in res.output and value in res.output
    assert "Traceback" not in res.output and not (tmp_path / "runs").exists()


def test_frozen_parameters_stay_frozen():
    """A parameter the factory froze (requires_grad False) is not updated in a group."""
    r = parse_recipe({
        "name": "fz", "model": {"factory": "batched_models:frozen_input", "args": {"in_dim": 8}},
        "data": {"factory": "builtin:vectors", "args": {"dim": 8, "classes": 4}},
        "widths": {"proxy": 16, "target": 32},
        "train": {"optimizer": "adamw", "lr": 1e-2, "steps": 5, "batch_size": 8, "eval_batches": 1,
                  "weight_decay": 0.1}})
    hp = HParams.from_train(r.train)
    batch = build_batch(r, 16, [hp, hp], [0, 1], "cpu", True)
    before = batch.views(batch.flat.clone())
    train(batch, make_optimizer(batch, "adamw"), SlotData(batch, lambda s: experiment.data_stream(r, "train", s)),
          experiment.train_config(r, steps=5))
    after = batch.views(batch.flat)
    assert torch.equal(before["inp.weight"], after["inp.weight"])
    assert not torch.equal(before["out.weight"], after["out.weight"])


def test_a_group_that_does_not_fit_runs_in_halves(tmp_path, monkeypatch):
    """CUDA out of memory for a group: the same trials run in halves; later groups stay smaller."""
    from mutransfer.commands import tuning

    real, sizes = tuning.run_group, []

    def tight(recipe, width, device, trials, hps, val, vectorise=True, done=None, ask=None):
        sizes.append(len(trials))
        if len(trials) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(recipe, width, device, trials, hps, val, vectorise, done, ask)

    monkeypatch.setattr(tuning, "run_group", tight)
    _qs(tmp_path, trials=7)
    res = cli_in(tmp_path, "tune", "q.yaml", "--parallel-trials", "5", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "did not fit in GPU memory" in res.output
    assert sizes[:4] == [5, 3, 2, 1] and all(n <= 2 for n in sizes[4:]), sizes
    st = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path}/runs/quickstart/study.db")
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in st.trials) == 7
    assert not [t for t in st.trials if t.state == TrialState.FAIL]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_trial_refilled_into_a_freed_place_trains_as_it_would_alone(optimizer):
    """Trial 2 is pruned at step 10; `ask` puts trial 3 in its place at that evaluation point. Trial 3
    starts from its own step 0 (data, schedule, optimizer state, bias corrections) while trial 1 is
    at step 10: both end as each would alone, within 1e-5 relative."""
    r = gpt_recipe(optimizer, steps=30, schedule="cosine", warmup=4)
    r = r.model_copy(update={"search": r.search.model_copy(update={"report_every": 10, "seeds": 2})})
    base = HParams.from_train(r.train)
    hps = [base.with_values(v) for v in ({"lr": 3e-3}, {"lr": 1e-2}, {"lr": 5e-3, "output_init": 0.5})]
    val = experiment.val_batches(r, 2, seed=0)
    third = [FakeTrial()]

    def ask(k):
        return [(third.pop(), hps[2])] if third else []

    trials = [FakeTrial(), FakeTrial(prune_at=10)]
    out = run_group(r, 32, "cpu", trials, hps[:2], val, ask=ask)
    assert [o.state for o in out] == ["complete", "pruned", "complete"]
    assert out[2].attrs["steps_run"] == 60 and out[1].attrs["steps_run"] == 20
    alone = [run_group(r, 32, "cpu", [FakeTrial()], [h], val)[0] for h in (hps[0], hps[2])]
    assert out[0].value == pytest.approx(alone[0].value, rel=1e-5)
    assert out[2].value == pytest.approx(alone[1].value, rel=1e-5)
    assert out[2].attrs["seed_values"] == pytest.approx(alone[1].attrs["seed_values"], rel=1e-5)
