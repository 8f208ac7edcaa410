"""`mutransfer scale`: a 30-step CPU run of a GPT recipe, kill-and-resume, NaN stop, hparams sources,
the TP5 check, bad input, and 2-process gloo torchrun (DDP, then FSDP2 resuming) against 1 process."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mutransfer.cli import app
from mutransfer.commands.scale import transfer_check
from mutransfer.run.hparams_file import write_hparams_file

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

RECIPE = {
    "name": "tiny",
    "model": {"factory": "builtin:gpt", "args": {"layers": 1, "heads": 2, "vocab": 256, "seq_len": 16}},
    "data": {"factory": "scale_data:slow_pysource", "args": {"seq_len": 16}},
    "widths": {"proxy": 16, "target": 32},
    "train": {"optimizer": "adamw", "lr": 1.0e-2, "steps": 30, "batch_size": 8, "eval_batches": 4,
              "log_every": 5, "eval_every": 10},
}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("MUTRANSFER_TEST_SLOW_AFTER", None)
    return env


def scale(*args):
    return runner.invoke(app, ["scale", *map(str, args)])


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_val(out):
    return [m for m in metrics(out) if "val_loss" in m][-1]["val_loss"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation (and subprocesses use 1 too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    p = d / "tiny.yaml"
    p.write_text(yaml.safe_dump(RECIPE))
    return p


@pytest.fixture(scope="module")
def reference(recipe):
    """The uninterrupted 30-step CPU run every other test compares with."""
    out = recipe.parent / "ref"
    r = scale(recipe, "--device", "cpu", "--out", out, "--checkpoint-every", 10, "--hparams",
              _hparams(recipe.parent / "hp.yaml", best_value=None))
    assert r.exit_code == 0, r.output
    return out, r.output


def _hparams(path, best_value=None, optimizer="adamw", steps=30, lr=1e-2):
    return write_hparams_file(path, recipe="tiny.yaml", proxy_width=16, optimizer=optimizer, hparams={"lr": lr},
                              best_value=best_value, study="tiny", storage="none", steps=steps)


def test_thirty_step_cpu_run_writes_a_reproducible_record(reference):
    out, output = reference
    assert "tuned values from" in output and "summary" in output
    m = metrics(out)
    assert [x["step"] for x in m] == [5, 10, 15, 20, 25, 30]
    assert [x["step"] for x in m if "val_loss" in x] == [10, 20, 30]
    for x in m:
        assert {"step", "loss", "lr", "samples_per_s", "tokens_per_s"} <= set(x) and x["tokens_per_s"] > 0
        assert "mfu" not in x                                # CPU: no MFU
    assert m[-1]["val_loss"] < m[1]["val_loss"] < 5.0        # it learns (ln 256 = 5.55 at init)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "tiny"
    used = yaml.safe_load((out / "hparams.yaml").read_text())
    assert used["hparams"]["lr"] == 1e-2 and used["proxy_width"] == 16 and used["width"] == 32
    plan = json.loads((out / "plan.json").read_text())
    assert plan["width"] == 32 and plan["base_width"] == 16 and plan["cost"]["params"] > 0
    assert json.loads((out / "versions.json").read_text())["torch"] == torch.__version__
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "finished" and s["steps"] == 30 and s["val_loss"] == m[-1]["val_loss"]
    assert s["tokens_per_s"] == sorted(x["tokens_per_s"] for x in m)[3]   # median of the 6 intervals
    assert s["transfer"]["status"] == "skipped"              # the file has no best_value
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020.pt", "step-00000030.pt"]


def test_kill_and_resume_gives_the_same_final_loss(recipe, reference):
    ref, _ = reference
    out = recipe.parent / "killed"
    # the same thread count as this process (1): CPU results are bitwise reproducible only then
    env = dict(_env(), MUTRANSFER_TEST_SLOW_AFTER="12")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mutransfer.cli", "scale", str(recipe), "--device", "cpu", "--out", str(out),
         "--checkpoint-every", "5", "--hparams", str(recipe.parent / "hp.yaml")],
        cwd=recipe.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoints" / "step-00000010.pt"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), proc.stderr.read().decode()[-2000:]
    assert not (out / "checkpoints" / "step-00000030.pt").exists()     # it really died mid-run
    assert not list((out / "checkpoints").glob("*.tmp"))
    r = scale(recipe, "--device", "cpu", "--out", out, "--checkpoint-every", 5, "--resume",
              "--hparams", recipe.parent / "hp.yaml")
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.output
    got, want = metrics(out), metrics(ref)
    assert [x["step"] for x in got] == [x["step"] for x in want]      # one run's worth of lines, no duplicates
    assert got[-1]["loss"] == want[-1]["loss"]                          # exactly equal on CPU
    assert got[-1]["val_loss"] == want[-1]["val_loss"]


def test_ctrl_c_checkpoints_at_a_step_boundary_and_exits_130(recipe, reference):
    ref, _ = reference
    out = recipe.parent / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mutransfer.cli", "scale", str(recipe), "--device", "cpu", "--out", str(out),
         "--checkpoint-every", "10", "--hparams", str(recipe.parent / "hp.yaml")],
        cwd=recipe.parent, env=dict(_env(), MUTRANSFER_TEST_SLOW_AFTER="12"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = out / "checkpoints" / "step-00000010.pt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted at step" in text and "--resume" in text
    steps = [int(p.name[5:13]) for p in (out / "checkpoints").glob("step-*.pt")]
    assert 10 < max(steps) < 20                      # the step in flight finished and was saved
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    r = scale(recipe, "--device", "cpu", "--out", out, "--resume", "--hparams", recipe.parent / "hp.yaml")
    assert r.exit_code == 0, r.output
    assert metrics(out)[-1]["loss"] == metrics(ref)[-1]["loss"]


def test_nan_loss_exits_1_and_keeps_the_last_good_checkpoint(tmp_path):
    p = tmp_path / "nan.yaml"
    p.write_text(yaml.safe_dump({
        "name": "nan", "loss": "mse",
        "model": {"factory": "builtin:mlp", "args": {"in_dim": 8, "out_dim": 1, "depth": 2}},
        "data": {"factory": "scale_data:nan_vectors", "args": {"dim": 8, "nan_at": 7}},
        "widths": {"proxy": 8, "target": 16},
        "train": {"optimizer": "adam", "lr": 1e-3, "steps": 20, "batch_size": 4, "eval_batches": 2, "log_every": 1},
    }))
    out = tmp_path / "run"
    r = scale(p, "--device", "cpu", "--out", out, "--checkpoint-every", 5, "--hparams", tmp_path / "none.yaml")
    assert r.exit_code == 2 and "--hparams" in r.output and not out.exists()   # bad path: nothing written
    r = scale(p, "--device", "cpu", "--out", out, "--checkpoint-every", 5)
    assert r.exit_code == 1, r.output
    assert "loss became nan at step 8" in r.output and "step-00000005.pt" in r.output
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-00000005.pt"]
    assert max(m["step"] for m in metrics(out)) == 7
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_default_hparams_file_and_the_wider_is_better_check(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(recipe, tmp_path / "tiny.yaml")
    _hparams(tmp_path / "runs" / "tiny" / "hparams.yaml", best_value=0.5, steps=10)   # an impossibly good proxy
    r = scale("tiny.yaml", "--device", "cpu", "--steps", 10)
    assert r.exit_code == 0, r.output                           # the run itself succeeded
    assert "runs/tiny/hparams.yaml" in r.output and "TRANSFER FAILED" in r.output
    s = json.loads(Path("runs/tiny/scale-32/summary.json").read_text())
    assert s["transfer"]["status"] == "failed" and s["transfer"]["proxy"] == 0.5
    assert s["out"] == "runs/tiny/scale-32"
    # a second run into the same folder must not silently overwrite it
    r = scale("tiny.yaml", "--device", "cpu", "--steps", 10)
    assert r.exit_code == 2 and "--resume" in r.output
    # a file tuned with another optimizer is refused, before anything is written
    _hparams(tmp_path / "sgd.yaml", optimizer="sgd")
    r = scale("tiny.yaml", "--device", "cpu", "--hparams", "sgd.yaml", "--out", "other")
    assert r.exit_code == 2 and "'sgd'" in r.output and not Path("other").exists()
    # resuming with another width is refused by the checkpoint's fingerprint
    r = scale("tiny.yaml", "--device", "cpu", "--steps", 10, "--width", 48, "--resume", "--out", "runs/tiny/scale-32")
    assert r.exit_code == 2 and "width" in r.output
    r = scale("tiny.yaml", "--fsdp", "--device", "cpu", "--out", "other")
    assert r.exit_code == 2 and "torchrun" in r.output and not Path("other").exists()


def test_transfer_check_rules():
    f = {"best_value": 2.0, "steps": 100}
    assert transfer_check(1.9, f, 100)["status"] == "ok"
    assert transfer_check(2.1, f, 100)["status"] == "failed"
    assert transfer_check(1.9, f, 50)["status"] == "skipped"            # other step count: not comparable
    assert transfer_check(1.9, {"best_value": 2.0}, 100)["status"] == "skipped"
    assert transfer_check(1.9, None, 100)["status"] == "skipped"


def _torchrun(recipe, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mutransfer.cli", "scale", str(recipe), "--device", "cpu", "--hparams",
           str(recipe.parent / "hp.yaml"), *map(str, args)]
    p = subprocess.Popen(cmd, cwd=recipe.parent, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        p.terminate()            # SIGTERM: torchrun stops its workers (they run in their own sessions)
        out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out[-3000:]
    return out


def test_torchrun_two_processes_match_one_ddp_then_fsdp_resuming(recipe, reference):
    ref, _ = reference
    ddp = recipe.parent / "ddp"
    out = _torchrun(recipe, "--out", ddp, "--checkpoint-every", 10)
    assert "2 processes (DDP)" in out
    # same global batch (8 = 2 x 4), per-rank streams seeded seed + rank: the same training up to
    # sampling noise; validation runs on the same fixed batches
    v1, v2 = final_val(ref), final_val(ddp)
    assert abs(v1 - v2) < 0.05 * v1, (v1, v2)
    ck = torch.load(ddp / "checkpoints" / "step-00000030.pt", weights_only=True)
    assert ck["world_size"] == 2 and [r["data"]["position"] for r in ck["ranks"]] == [30, 30]
    # FSDP2 resumes the DDP run's step-20 checkpoint (state dicts are keyed by name): same numbers
    fsdp = recipe.parent / "fsdp"
    shutil.copytree(ddp, fsdp)
    (fsdp / "checkpoints" / "step-00000030.pt").unlink()
    out = _torchrun(recipe, "--out", fsdp, "--fsdp", "--resume")
    assert "FSDP2" in out and "step 20" in out
    assert final_val(fsdp) == pytest.approx(v2, rel=1e-4)
    assert [m["step"] for m in metrics(fsdp)] == [m["step"] for m in metrics(ddp)]


def test_data_position_restores_by_skipping_or_by_state_dict():
    from mutransfer.run.checkpoint import Resumable

    def stream(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randint(0, 9, (2,), generator=g), None

    a = Resumable(stream(3))
    for _ in range(5):
        next(a)
    b = Resumable(stream(3))
    b.load_state_dict(a.state_dict())                       # re-created and advanced 5 batches
    assert b.position == 5 and torch.equal(next(a)[0], next(b)[0])

    class Stateful:
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            return self.i

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, d):
            self.i = d["i"]

    s = Resumable(Stateful())
    next(s), next(s)
    assert s.state_dict() == {"position": 2, "inner": {"i": 2}}
    t = Resumable(Stateful())
    t.load_state_dict(s.state_dict())                        # restored, not replayed
    assert next(t) == 3 and t.position == 3


def test_rng_states_round_trip():
    import random

    from mutransfer.run.checkpoint import rng_state, set_rng_state

    st = rng_state()
    want = (torch.rand(3), random.random())
    torch.rand(5), random.random()
    set_rng_state(st)
    got = (torch.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and want[1] == got[1]


def test_transfer_is_relative_to_the_width_the_file_was_tuned_at(recipe, tmp_path):
    from mutransfer.commands.scale import resolve_hparams
    from mutransfer.run.recipe import load_recipe

    r = load_recipe(recipe)
    p = write_hparams_file(tmp_path / "h.yaml", recipe="tiny.yaml", proxy_width=8, optimizer="adamw",
                           hparams={"lr": 0.02, "output_init": 2.0}, best_value=3.0, study="s", storage="none")
    src = resolve_hparams(r, str(p))
    assert src.base_width == 8 and src.hparams.lr == 0.02 and src.hparams.mult("output", "init") == 2.0
    assert resolve_hparams(r, None, runs_dir=str(tmp_path)).base_width == 16     # no file: the recipe's proxy
