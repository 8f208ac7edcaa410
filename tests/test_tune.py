"""`mutransfer tune`: search through train(), divergence penalties, resume after SIGKILL, local workers.

Trials are tiny (an MLP of width 16 on synthetic vectors, or the quick-start GPT at width 32 for a few
steps); subprocess runs use one torch thread so two engineers' worth of tests fit on 2 cores."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from mutransfer.cli import app
from mutransfer.run.hparams_file import read_hparams_file
from mutransfer.run.study import HEARTBEAT_ATTR, count_finished, fail_stale, open_storage

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def tiny_recipe(path: Path, steps: int = 20, lr=(1e-3, 1e-1), **search) -> Path:
    r = {
        "name": "tiny",
        "model": {"factory": "builtin:mlp", "args": {"in_dim": 16, "out_dim": 4, "depth": 2}},
        "data": {"factory": "builtin:vectors", "args": {"dim": 16, "classes": 4}},
        "loss": "cross_entropy",
        "widths": {"proxy": 16, "target": 64},
        "train": {"optimizer": "adamw", "lr": 1e-2, "steps": steps, "batch_size": 16, "eval_batches": 2},
        "search": {"trials": 4, "sampler_seed": 0, "heartbeat": 1,
                   "params": {"lr": {"low": lr[0], "high": lr[1], "log": True}}, **search},
    }
    path.write_text(yaml.safe_dump(r))
    return path


def load(storage: str, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def cli(*args):
    return runner.invoke(app, ["tune", *map(str, args)])


def spawn(cwd: Path, *args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # the child gets SIGINT at its default even when this suite was started with it ignored (`pytest &`)
    return subprocess.Popen([sys.executable, "-m", "mutransfer.cli", "tune", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_quickstart_small_tune_writes_hparams_and_plot_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    r["train"].update(steps=8, eval_batches=2)
    r["search"]["trials"] = 3
    r["search"]["sampler_seed"] = 1
    Path("qs.yaml").write_text(yaml.safe_dump(r))
    res = cli("qs.yaml", "--width", 32, "--plot", "hist.png")
    assert res.exit_code == 0, res.output
    hp = read_hparams_file("runs/quickstart/hparams.yaml")
    assert hp["proxy_width"] == 32 and hp["steps"] == 8 and hp["optimizer"] == "adamw"
    assert hp["storage"] == "sqlite:///runs/quickstart/study.db" and hp["study"] == "quickstart"
    assert set(hp["hparams"]) == {"lr", "output_init"}
    assert 1e-4 <= hp["hparams"]["lr"] <= 3e-1
    study = load(hp["storage"], "quickstart")
    assert count_finished(study) == 3
    assert hp["best_value"] == pytest.approx(min(t.value for t in study.trials if t.state == TrialState.COMPLETE
                                                 and not t.user_attrs["diverged"]))
    png = Path("hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the same command again: nothing left to run, same outputs
    res = cli("qs.yaml", "--width", 32)
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and count_finished(load(hp["storage"], "quickstart")) == 3
    # a different width cannot join this study
    res = cli("qs.yaml", "--width", 48)
    assert res.exit_code == 2 and "--width" in res.output and "Traceback" not in res.output


def test_diverging_lrs_are_penalised_not_lost(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_recipe(Path("t.yaml"), lr=(1e-3, 1e2), sampler="random", pruner="none", trials=6)
    res = cli("t.yaml")
    assert res.exit_code == 0, res.output
    trials = load("sqlite:///runs/tiny/study.db").trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    div = [t for t in trials if t.user_attrs["diverged"]]
    ok = [t for t in trials if not t.user_attrs["diverged"]]
    assert div and ok, [(t.params, t.value) for t in trials]
    # finite penalties, worse than every converged trial; the best is a converged one
    assert all(t.value < 1e9 for t in div) and min(t.value for t in div) > max(t.value for t in ok)
    assert all(t.user_attrs["reason"] for t in div)
    hp = read_hparams_file("runs/tiny/hparams.yaml")
    assert hp["best_value"] == pytest.approx(min(t.value for t in ok))


def test_every_trial_diverging_exits_1_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_recipe(Path("t.yaml"), lr=(1e3, 1e4), sampler="random", trials=3)
    res = cli("t.yaml")
    assert res.exit_code == 1, res.output
    assert "every trial diverged" in res.output
    assert not Path("runs/tiny/hparams.yaml").exists()


@pytest.mark.parametrize("sampler, pruner", [("gp", "hyperband"), ("tpe", "median"), ("cmaes", "none")])
def test_each_sampler_and_pruner_runs(tmp_path, monkeypatch, sampler, pruner):
    monkeypatch.chdir(tmp_path)
    tiny_recipe(Path("t.yaml"), steps=10, trials=2, sampler=sampler, pruner=pruner, startup_trials=1,
                params={"lr": {"low": 1e-3, "high": 1e-1, "log": True}, "output_init": {"low": 0.5, "high": 2.0}})
    res = cli("t.yaml")
    assert res.exit_code == 0, res.output
    study = load("sqlite:///runs/tiny/study.db")
    assert count_finished(study) == 2
    assert read_hparams_file("runs/tiny/hparams.yaml")["hparams"].keys() == {"lr", "output_init"}


@pytest.mark.parametrize("args, where", [
    (["--trials", "0"], "--trials"),
    (["--workers", "0"], "--workers"),
    (["--storage", "nonsense"], "--storage"),
    (["--plot", "x.jpg"], "--plot"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, monkeypatch, args, where):
    monkeypatch.chdir(tmp_path)
    tiny_recipe(Path("t.yaml"))
    res = cli("t.yaml", *args)
    assert res.exit_code == 2 and where in res.output and "Traceback" not in res.output
    assert not Path("runs/tiny/hparams.yaml").exists()


def test_bad_search_section_names_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_recipe(Path("t.yaml"), params={"lr_typo": {"low": 1e-3, "high": 1e-1}})
    res = cli("t.yaml")
    assert res.exit_code == 2 and "search.params" in res.output and "unknown tunable" in res.output
    tiny_recipe(Path("t.yaml"), params={"momentum": {"low": 0.5, "high": 1.5}})
    res = cli("t.yaml")
    assert res.exit_code == 2 and "search.params.momentum" in res.output


def test_python_api_takes_the_cli_options_and_checks_them_the_same_way(tmp_path, monkeypatch):
    """mutransfer.tune(recipe, **options) runs the CLI's implementation: same options, same checks,
    the written hparams file's contents returned."""
    import mutransfer

    monkeypatch.chdir(tmp_path)
    tiny_recipe(Path("t.yaml"), steps=4)
    with pytest.raises(mutransfer.UserError, match="--trials"):
        mutransfer.tune("t.yaml", trials=0)
    with pytest.raises(mutransfer.UserError, match="--parallel-trials"):
        mutransfer.tune("t.yaml", parallel_trials=5000)
    with pytest.raises(TypeError):
        mutransfer.tune("t.yaml", trails=2)
    best = mutransfer.tune("t.yaml", trials=2, out="best.yaml", device="cpu", parallel_trials=2)
    assert best == read_hparams_file("best.yaml") and best["proxy_width"] == 16 and best["trials"] == 2
    assert count_finished(load("sqlite:///runs/tiny/study.db")) == 2


def test_journal_heartbeat_fails_only_stale_running_trials(tmp_path):
    url = f"journal:{tmp_path / 'j.log'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    stale, alive = study.ask(), study.ask()
    study._storage.set_trial_user_attr(stale._trial_id, HEARTBEAT_ATTR, time.time() - 100)
    study._storage.set_trial_user_attr(alive._trial_id, HEARTBEAT_ATTR, time.time())
    assert fail_stale(study, grace_period=30) == [stale.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {stale.number: TrialState.FAIL, alive.number: TrialState.RUNNING}


def mid_trial(t, steps: int) -> bool:
    """RUNNING with its first reports in and at least 40 % of its steps to go (so a signal lands inside it)."""
    return t.state == TrialState.RUNNING and bool(t.intermediate_values) and max(t.intermediate_values) <= 0.6 * steps


def wait_for(proc: subprocess.Popen, url: str, db: Path, done: int, steps: int, timeout: float = 60) -> list:
    """Poll the study until `done` trials are COMPLETE and another is mid-trial; the trials then."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                trials = load(url).get_trials()
            except Exception:  # noqa: BLE001 - the study may not exist yet
                trials = []
            if (sum(t.state == TrialState.COMPLETE for t in trials) >= done
                    and any(mid_trial(t, steps) for t in trials)):
                return trials
        time.sleep(0.02)
    proc.kill()
    out, _ = proc.communicate()
    raise AssertionError(f"the run ended or stalled before {done} trials finished:\n{out}")


STEPS = 400


def test_sigkill_then_ctrl_c_then_rerun_ends_with_exactly_n_finished(tmp_path):
    # trials long enough (~0.3 s) that the poll sees one mid-way; N leaves room for a poll that, on a
    # loaded machine, sees a few more trials finish than it waited for before the kill lands
    N = 8
    tiny_recipe(tmp_path / "t.yaml", steps=STEPS, trials=N, pruner="none")
    db = tmp_path / "runs" / "tiny" / "study.db"
    url = f"sqlite:///{db}"
    # one trial at a time (this test counts single orphans; groups: the test below)
    one = ("--parallel-trials", 1)
    # 1. killed with SIGKILL mid-trial: the trial stays RUNNING in the storage
    proc = spawn(tmp_path, "t.yaml", *one)
    wait_for(proc, url, db, done=2, steps=STEPS)
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = {t.number: t.value for t in load(url).get_trials() if t.state == TrialState.COMPLETE}
    orphan = [t.number for t in load(url).get_trials() if t.state == TrialState.RUNNING]
    assert 2 <= len(before) <= N - 2 and len(orphan) == 1
    time.sleep(max(0.0, killed_at + 3.5 - time.time()))   # the heartbeat grace period (3 x 1 s)
    # 2. rerun, then Ctrl-C (SIGINT) mid-trial: clean stop, exit 130, finished trials kept
    proc = spawn(tmp_path, "t.yaml", *one)
    wait_for(proc, url, db, done=len(before) + 1, steps=STEPS)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    trials = load(url).get_trials()
    assert [t.state for t in trials if t.number in orphan] == [TrialState.FAIL]   # the heartbeat rule
    assert not [t for t in trials if t.state == TrialState.RUNNING]              # Ctrl-C failed its trial
    kept = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    assert len(kept) > len(before) and {k: kept[k] for k in before} == before
    # 3. rerun to the end
    proc = spawn(tmp_path, "t.yaml", *one)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "resuming" in out
    trials = load(url).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == N                                  # exactly N
    assert {t.number: t.value for t in finished if t.number in kept} == kept   # kept, not redone
    assert len({t.params["lr"] for t in finished}) == N        # no trial repeated
    assert len(trials) == N + 2                                # N finished + the killed + the interrupted


def test_a_killed_group_leaves_its_trials_to_the_heartbeat_and_the_rerun_ends_with_exactly_n(tmp_path):
    """Groups of trials (the tiny MLP is batched by default): SIGKILL mid-group leaves the group's
    trials RUNNING; they are failed by the heartbeat rule and the rerun finishes exactly N."""
    N = 8
    tiny_recipe(tmp_path / "t.yaml", steps=STEPS, trials=N, pruner="none")
    db = tmp_path / "runs" / "tiny" / "study.db"
    url = f"sqlite:///{db}"
    proc = spawn(tmp_path, "t.yaml", "--parallel-trials", 3)
    def second_group_running() -> bool:
        try:
            st = load(url)
        except KeyError:                 # the file exists, the study not yet
            return False
        return len(st.get_trials(states=(TrialState.RUNNING,))) == 3 and count_finished(st) >= 3

    deadline = time.time() + 60
    while time.time() < deadline and not (db.exists() and second_group_running()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    orphans = [t.number for t in load(url).get_trials() if t.state == TrialState.RUNNING]
    # the kill lands a moment after the poll: the group may have told one or two of its trials by then
    assert 1 <= len(orphans) <= 3, [(t.number, t.state) for t in load(url).get_trials()]
    time.sleep(3.5)                                              # the heartbeat grace period (3 x 1 s)
    proc = spawn(tmp_path, "t.yaml", "--parallel-trials", 3)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    trials = load(url).get_trials()
    assert count_finished(load(url)) == N
    assert {t.number for t in trials if t.state == TrialState.FAIL} == set(orphans)
    assert len({t.number for t in trials}) == len(trials) == N + len(orphans)


def test_two_local_workers_share_one_journal_storage(tmp_path):
    tiny_recipe(tmp_path / "t.yaml", steps=60, trials=4)
    proc = spawn(tmp_path, "t.yaml", "--workers", 2, "--storage", "journal:runs/j.log")
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    study = load(f"journal:{tmp_path / 'runs' / 'j.log'}")
    assert 4 <= count_finished(study) <= 5                     # N, at most N + K - 1
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert len({t.params["lr"] for t in study.trials}) == len(study.trials)   # the workers drew different values
    assert read_hparams_file(tmp_path / "runs" / "tiny" / "hparams.yaml")["storage"] == "journal:runs/j.log"
