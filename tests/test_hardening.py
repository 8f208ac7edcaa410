"""Careless and hostile input, faults and containment: each case reproduces a failure seen in the
field and checks the exit code, one line, and that nothing was written or damaged (a snapshot of the
folder before and after), nothing outside the output folder, and modes that honour the umask."""
import contextlib
import errno
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from mutransfer import atomic
from mutransfer.cli import main
from mutransfer.commands.scale import RunLock
from mutransfer.commands.sweep import Point
from mutransfer.run.study import open_storage, repair_journal
from mutransfer.run.user_code import resolve_factory

from helpers import cli_in, one_line, subprocess_env  # tests/ is on sys.path (pytest's rootdir-relative import)

HERE = Path(__file__).parent


def recipe(tmp: Path, name="tiny", data=None, model=None, **extra) -> Path:
    r = {
        "name": name,
        "model": model or {"factory": "builtin:mlp", "args": {"in_dim": 8, "out_dim": 4, "depth": 2}},
        "data": data or {"factory": "builtin:vectors", "args": {"dim": 8, "classes": 4}},
        "widths": {"proxy": 16, "target": 32},
        "train": {"optimizer": "adamw", "lr": 1e-2, "steps": 6, "batch_size": 8, "eval_batches": 1},
        "search": {"trials": 2, "sampler_seed": 0, "heartbeat": 1,
                   "params": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}},
        **extra,
    }
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


cli = cli_in

def one_line_exit_2(res, *needles):
    return one_line(res, 2, *needles)


env = subprocess_env


def spawn(tmp: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mutransfer.cli", *map(str, args)], cwd=tmp, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# ------------------------------------------------------------------------------------- data loss

def test_torn_journal_tail_is_repaired_and_every_finished_trial_kept(tmp_path):
    r = recipe(tmp_path)
    res = cli(tmp_path, "tune", r, "--storage", "journal:study.log")
    assert res.exit_code == 0, res.output
    log = tmp_path / "study.log"
    n_before = len(optuna.load_study(study_name="tiny", storage=open_storage("journal:" + str(log))).get_trials())
    with open(log, "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "para')      # disk full mid-write
    res = cli(tmp_path, "tune", r, "--storage", "journal:study.log", "--trials", "3")
    assert res.exit_code == 0, res.output
    study = optuna.load_study(study_name="tiny", storage=open_storage("journal:" + str(log)))
    assert len([t for t in study.get_trials() if t.state.is_finished()]) >= 3 >= n_before
    assert repair_journal(log) == 0


@pytest.mark.parametrize("case", ["tune-out-recipe", "tune-out-study", "dry-run-json-recipe", "scale-out-tune-dir",
                                  "plot-foreign-file", "coord-json-foreign"])
def test_outputs_never_overwrite_what_mutransfer_did_not_write(tmp_path, case):
    r = recipe(tmp_path)
    assert cli(tmp_path, "tune", r).exit_code == 0
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    (tmp_path / "photo.png").write_bytes(b"\x89PNG not ours")
    before = snapshot(tmp_path)
    args = {
        "tune-out-recipe": ("tune", r, "--out", r),
        "tune-out-study": ("tune", r, "--out", "runs/tiny/study.db"),
        "dry-run-json-recipe": ("scale", r, "--dry-run", "--json", "notes.json"),
        "scale-out-tune-dir": ("scale", r, "--out", "runs/tiny"),
        "plot-foreign-file": ("tune", r, "--plot", "photo.png"),
        "coord-json-foreign": ("coord-check", r, "--widths", "16,32", "--json", "notes.json"),
    }[case]
    one_line_exit_2(cli(tmp_path, *args))
    assert snapshot(tmp_path) == before


def test_outputs_mutransfer_wrote_are_overwritten_and_honour_the_umask(tmp_path):
    r = recipe(tmp_path)
    old = os.umask(0o022)
    try:
        assert cli(tmp_path, "scale", r, "--dry-run", "--json", "plan.json").exit_code == 0
        assert cli(tmp_path, "scale", r, "--dry-run", "--json", "plan.json").exit_code == 0   # ours: rewritten
        assert (os.stat(tmp_path / "plan.json").st_mode & 0o777) == 0o644
        assert cli(tmp_path, "tune", r).exit_code == 0
        for p in (tmp_path / "runs" / "tiny").iterdir():
            if p.is_file() and not p.name.endswith(".lock"):
                assert (p.stat().st_mode & 0o777) == 0o644, p
        f = tmp_path / "x.txt"
        f.write_text("a")
        os.chmod(f, 0o640)
        atomic.write_text(f, "b")
        assert (f.stat().st_mode & 0o777) == 0o640          # an existing file keeps its mode
    finally:
        os.umask(old)


def test_scale_resume_of_a_finished_run_changes_nothing(tmp_path):
    r = recipe(tmp_path)
    assert cli(tmp_path, "scale", r).exit_code == 0
    run = tmp_path / "runs" / "tiny" / "scale-32"
    before = snapshot(run)
    res = cli(tmp_path, "scale", r, "--resume")
    assert res.exit_code == 0 and "already finished" in res.output
    assert snapshot(run) == before
    json.loads((run / "summary.json").read_text())          # strict JSON (no NaN)


def test_a_second_scale_on_a_locked_folder_is_refused(tmp_path):
    r = recipe(tmp_path)
    run = tmp_path / "runs" / "tiny" / "scale-32"
    lock = RunLock(run)
    lock.acquire()
    try:
        one_line_exit_2(cli(tmp_path, "scale", r, "--resume"), "another scale run")
    finally:
        lock.release()


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".summary.json.abc.tmp").write_text("half")
    assert [p.name for p in atomic.clean_stale_temporaries(tmp_path)] == [".summary.json.abc.tmp"]


def test_sweep_values_closer_than_six_digits_do_not_share_a_cache_file():
    a, b = Point("mup", 64, 1e-3, 0), Point("mup", 64, 1.0000001e-3, 0)
    assert a.filename("lr") != b.filename("lr")


# ------------------------------------------------------------------------- security, containment

def test_cwd_goes_after_the_installed_packages_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "usermod.py").write_text("def f(width):\n    return width\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert resolve_factory("usermod:f", "model.factory", {})(width=3) == 3
    assert sys.path[-1] == str(tmp_path)       # after site-packages: importable, never shadowing


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b"])
def test_recipe_names_cannot_leave_runs(tmp_path, name):
    r = recipe(tmp_path, name="ok")
    d = yaml.safe_load(r.read_text())
    d["name"] = name
    r.write_text(yaml.safe_dump(d))
    one_line_exit_2(cli(tmp_path, "tune", r), "name")
    assert snapshot(tmp_path) == {"ok.yaml": hashlib.sha1(r.read_bytes()).hexdigest()}


def test_yaml_alias_bomb_duplicate_keys_and_deep_nesting_are_one_line(tmp_path):
    r = recipe(tmp_path)
    text = r.read_text()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    t0 = time.time()
    (tmp_path / "bomb.yaml").write_text(bomb + text)
    one_line_exit_2(cli(tmp_path, "scale", tmp_path / "bomb.yaml", "--dry-run"), "aliases")
    (tmp_path / "anchors.yaml").write_text("x: &w 16\n" + text.replace("proxy: 16", "proxy: *w"))   # fine
    assert "aliases" not in cli(tmp_path, "scale", tmp_path / "anchors.yaml", "--dry-run").output
    assert time.time() - t0 < 20
    (tmp_path / "dup.yaml").write_text(text + "name: other\n")
    one_line_exit_2(cli(tmp_path, "scale", tmp_path / "dup.yaml", "--dry-run"), "duplicate key 'name'")
    (tmp_path / "deep.yaml").write_text("x: " + "[" * 3000 + "]" * 3000 + "\n" + text)
    one_line_exit_2(cli(tmp_path, "scale", tmp_path / "deep.yaml", "--dry-run"))


def test_workers_beyond_the_cpus_are_refused(tmp_path):
    r = recipe(tmp_path)
    one_line_exit_2(cli(tmp_path, "tune", r, "--workers", "999"), "--workers", "CPUs")
    one_line_exit_2(cli(tmp_path, "sweep", r, "--workers", "999", "--lrs", "0.01"), "--workers")
    assert snapshot(tmp_path) == {"tiny.yaml": hashlib.sha1(r.read_bytes()).hexdigest()}


# ---------------------------------------------------------------------------------------- faults

def _children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
        return st.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_sigterm_to_tune_with_workers_stops_them_and_writes_hparams(tmp_path):
    r = recipe(tmp_path)
    d = yaml.safe_load(r.read_text())
    d["train"]["steps"] = 300
    d["search"]["trials"] = 50
    r.write_text(yaml.safe_dump(d))
    proc = spawn(tmp_path, "tune", r, "--workers", "2")
    db = tmp_path / "runs" / "tiny" / "study.db"
    deadline = time.time() + 120
    kids: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        kids = kids or _children_of(proc.pid)
        if db.exists():
            try:
                # plain sqlite3, closed at once: a reader's lingering SQLite lock would stall the workers
                with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:
                    n = con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
                if n >= 1:
                    break
            except Exception:  # noqa: BLE001
                pass
        time.sleep(0.1)
    kids = _children_of(proc.pid) or kids
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert (tmp_path / "runs" / "tiny" / "hparams.yaml").is_file(), out
    time.sleep(0.5)
    assert not [k for k in kids if _alive(k)], "worker processes outlived the parent"


def test_sigterm_is_exit_130_for_coord_check(tmp_path):
    r = recipe(tmp_path)
    proc = spawn(tmp_path, "coord-check", r, "--widths", "16,32,64,128,256,512,1024", "--steps", "400", "--seeds", "3")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob("runs/tiny/coord-check/*/w*.json")):
        time.sleep(0.1)              # the first (width, seed) is finished: the check is under way
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out


def test_two_tunes_at_once_on_a_new_sqlite_file(tmp_path):
    r = recipe(tmp_path)
    a, b = spawn(tmp_path, "tune", r), spawn(tmp_path, "tune", r)
    outs = [p.communicate(timeout=180)[0] for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs


def test_enospc_in_the_writer_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    r = recipe(tmp_path)
    real = atomic.os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    monkeypatch.setattr(atomic.os, "replace", full)
    res = cli(tmp_path, "scale", r, "--dry-run", "--json", "plan.json")   # the table prints, then the write fails
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == "error: plan.json: No space left on device; what finished before is kept"
    monkeypatch.setattr(atomic.os, "replace", real)
    assert snapshot(tmp_path) == {"tiny.yaml": hashlib.sha1(r.read_bytes()).hexdigest()}


def test_disk_full_on_a_small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        r = recipe(tmp_path)
        (mnt / "filler").write_bytes(b"\0" * (60 * 1024))
        res = cli(tmp_path, "scale", r, "--out", mnt / "run")
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert not [p for p in mnt.rglob("*.tmp")]
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)   # busy: detach lazily


# ------------------------------------------------------------------------------- clear errors

@pytest.mark.parametrize("factory,needle", [
    ("float_targets", "dtype"), ("out_of_range", "out of range"), ("finite", "iterator"),
    ("raises_later", "shard server"), ("val_other_shape", "validation"),
])
@pytest.mark.parametrize("command", ["scale", "tune"])
def test_bad_data_found_late_is_one_line_and_nothing_written(tmp_path, factory, needle, command):
    r = recipe(tmp_path, data={"factory": f"hostile_data:{factory}", "args": {}})
    sys.path.insert(0, str(HERE))
    before = snapshot(tmp_path)
    res = cli(tmp_path, command, r)
    if factory not in ("finite", "raises_later"):     # caught before anything is written
        one_line_exit_2(res, needle)
        assert snapshot(tmp_path) == before
    else:                                             # found when the iterator runs dry: the last line says so
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert res.output.strip().splitlines()[-1].startswith("error: data:") and needle in res.output
        again = cli(tmp_path, command, r)             # and the half-made run does not block a rerun
        assert again.exit_code == 2 and "already holds a run" not in again.output, again.output


@pytest.mark.parametrize("value,needle", [(".nan", "finite"), ("-0.5", "> 0"), ("1.0e+400", "finite")])
def test_hparams_values_are_range_checked(tmp_path, value, needle):
    r = recipe(tmp_path)
    (tmp_path / "hp.yaml").write_text(f"proxy_width: 16\noptimizer: adamw\nhparams: {{lr: {value}}}\n")
    one_line_exit_2(cli(tmp_path, "scale", r, "--hparams", "hp.yaml"), "hparams.lr", needle)
    (tmp_path / "hp.yaml").write_text("proxy_width: 16\noptimizer: adamw\nhparams: {beta1: 1.5}\n")
    one_line_exit_2(cli(tmp_path, "scale", r, "--hparams", "hp.yaml"), "hparams.beta1", "[0, 1)")


def test_storage_and_out_paths_of_the_wrong_kind(tmp_path):
    r = recipe(tmp_path)
    before = snapshot(tmp_path)
    one_line_exit_2(cli(tmp_path, "tune", r, "--storage", f"journal:{r}"), "not an Optuna journal")
    (tmp_path / "afile").write_text("x")
    one_line_exit_2(cli(tmp_path, "scale", r, "--out", "afile"), "--out", "is a file")
    assert snapshot(tmp_path) == {**before, "afile": hashlib.sha1(b"x").hexdigest()}


@pytest.mark.parametrize("change,needle", [
    (lambda d: d["model"].update(factory="hostile_data:lazy", args={}), "lazy"),
    (lambda d: d["model"].update(factory="hostile_data:exits", args={}), "sys.exit"),
    (lambda d: d["widths"].update(target=10**40), "widths.target"),
    (lambda d: d.update(loss="hinge"), "'hinge'"),
    (lambda d: d.update({"träin": d.pop("train")}), "träin: unknown key"),
])
def test_factory_and_recipe_mistakes_are_named(tmp_path, change, needle):
    sys.path.insert(0, str(HERE))
    r = recipe(tmp_path)
    d = yaml.safe_load(r.read_text())
    change(d)
    r.write_text(yaml.safe_dump(d, allow_unicode=True))
    res = cli(tmp_path, "tune", r)
    one_line_exit_2(res, needle)
    assert not (tmp_path / "runs").exists()


def test_usage_errors_are_one_line_with_the_value(tmp_path, capsys):
    r = recipe(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["tune", str(r), "--trials", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--trials" in err and "'many'" in err


def test_huge_widths_are_refused_before_a_study_or_cache_exists(tmp_path):
    r = recipe(tmp_path)
    one_line_exit_2(cli(tmp_path, "tune", r, "--width", "1000000000"), "--width")
    one_line_exit_2(cli(tmp_path, "coord-check", r, "--widths", "8,1000000000"), "--widths")
    assert not (tmp_path / "runs").exists()


def test_threads_follow_the_affinity_and_are_never_raised(monkeypatch):
    import torch

    from mutransfer import threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 4)
    assert threads.choose(workers=2) == 2 and threads.choose(explicit=3) == 3
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert threads.configure() == 1                 # a caller's lower choice stays
        torch.set_num_threads(8)
        assert threads.configure() == 4                 # more than the affinity allows: lowered
    finally:
        torch.set_num_threads(old)
