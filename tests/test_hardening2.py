"""Careless and unlucky users, second round (issue 22): interrupted batched tunes, full disks,
secrets and markup in messages, the README's PostgreSQL URL, checks that came late, damaged run
folders. Each case reproduces a failure seen in the field: exit code, one line, nothing written or
damaged (a snapshot of the folder before and after), no secret in any output."""
import hashlib
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
from optuna.trial import TrialState

from mutransfer.console import clean, literal
from mutransfer.errors import UserError, mask_secrets
from mutransfer.run import study as S
from mutransfer.signals import deferred_interrupts

from helpers import cli_in as cli
from helpers import one_line, subprocess_env

HERE = Path(__file__).parent
optuna.logging.set_verbosity(optuna.logging.ERROR)


def recipe(tmp: Path, name="tiny", steps=6, trials=2, **extra) -> Path:
    r = {
        "name": name,
        "model": {"factory": "builtin:mlp", "args": {"in_dim": 8, "out_dim": 4, "depth": 2}},
        "data": {"factory": "builtin:vectors", "args": {"dim": 8, "classes": 4}},
        "widths": {"proxy": 16, "target": 32},
        "train": {"optimizer": "adamw", "lr": 1e-2, "steps": steps, "batch_size": 8, "eval_batches": 1},
        "search": {"trials": trials, "sampler_seed": 0, "heartbeat": 1,
                   "params": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}},
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(r.get(k), dict):
            r[k].update(v)
        else:
            r[k] = v
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def depth_recipe(tmp: Path, **extra) -> Path:
    return recipe(tmp, name="deep", model={"factory": "builtin:resmlp", "args": {"in_dim": 8, "out_dim": 4}},
                  depths={"proxy": 2, "target": 3}, **extra)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


env = subprocess_env


def _own_group():
    os.setsid()                                   # a process group of its own, as a terminal's job
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the suite itself may run with SIGINT ignored


def spawn_group(tmp: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mutransfer.cli", *map(str, args)], cwd=tmp, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_own_group)


def states(url: str, name: str) -> dict:
    if url.startswith("sqlite:///"):      # plain sqlite3, closed at once: a lingering reader's lock stalls writers
        import contextlib
        with contextlib.closing(sqlite3.connect(url[len("sqlite:///"):], timeout=60)) as con:
            return dict(con.execute("SELECT state, count(*) FROM trials GROUP BY state").fetchall())
    study = optuna.load_study(study_name=name, storage=S.open_storage(url))
    out: dict = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    S.release_connections(study)      # a reader's lingering SQLite lock would stall the workers' writes
    return out


# ------------------------------------------------------------------------------ interrupts

@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("sig,storage,group,workers", [
    (signal.SIGINT, "sqlite", 3, 2),         # the case: Ctrl-C of a batched tune with 2 workers
    (signal.SIGKILL, "journal", 3, 1),       # killed outright: the rerun must not wait for its trials
    (signal.SIGTERM, "sqlite", 1, 1),        # one trial at a time
])
def test_interrupted_tunes_leave_no_running_trial_and_the_rerun_reaches_exactly_n(tmp_path, sig, storage, group,
                                                                                  workers):
    N = 4
    r = recipe(tmp_path, steps=200, trials=N)
    url = f"sqlite:///{tmp_path / 's.db'}" if storage == "sqlite" else f"journal:{tmp_path / 's.log'}"
    args = ["tune", r, "--storage", url, "--parallel-trials", group, "--workers", workers, "--out", "hp.yaml"]
    proc = spawn_group(tmp_path, *args)
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:     # some trials finished, others training
        try:
            if (tmp_path / ("s.db" if storage == "sqlite" else "s.log")).exists():
                s = states(url, "tiny")
                if s.get("COMPLETE", 0) + s.get("PRUNED", 0) >= 1 and s.get("RUNNING", 0):
                    break
        except Exception:  # noqa: BLE001 - the study is being created
            pass
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    if sig != signal.SIGKILL:
        assert proc.returncode == 130, out
        if workers == 1:      # known leftover: a spawned worker hit while still importing prints a traceback
            assert "Traceback" not in out, out
        assert "RUNNING" not in states(url, "tiny"), (states(url, "tiny"), out)   # told FAIL on the way out
    t0 = time.time()
    res = cli(tmp_path, *args[:-4], "--out", "hp.yaml")        # the rerun, one worker: exactly N
    assert res.exit_code == 0, res.output
    s = states(url, "tiny")
    assert s.get("COMPLETE", 0) + s.get("PRUNED", 0) == N and "RUNNING" not in s, s
    assert yaml.safe_load((tmp_path / "hp.yaml").read_text())["trials"] == N
    assert time.time() - t0 < 100          # nobody waited for a dead process's trials


def test_a_dead_local_owner_is_failed_at_once_and_a_live_one_kept(tmp_path):
    st = S.open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60)
    study = optuna.create_study(storage=st, study_name="s")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a, b = study.ask(), S.ask_owned(study)
    study._storage.set_trial_user_attr(a._trial_id, S.OWNER_ATTR, S.owner_id().rsplit(":", 2)[0]
                                       + f":{dead.pid}:12345")
    assert S.owner_dead(study.trials[a.number].user_attrs[S.OWNER_ATTR])
    assert not S.owner_dead(S.owner_id()) and not S.owner_dead("elsewhere/abc:1:1") and not S.owner_dead(None)
    assert S.fail_stale(study, grace_period=3600) == [a.number]      # no grace period for a dead owner
    assert study.trials[b.number].state == TrialState.RUNNING
    assert S.fail_owned(study) == [b.number]


def test_an_rdb_trial_that_died_before_its_first_heartbeat_is_failed(tmp_path):
    st = S.open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1)
    study = optuna.create_study(storage=st, study_name="s")
    t = study.ask()                        # no owner, no heartbeat: a process killed right after ask()
    assert S.fail_stale(study, grace_period=3600) == []
    assert S.fail_stale(study, grace_period=0.0) == [t.number]


def test_a_journal_lock_left_by_a_killed_process_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    log = tmp_path / "j.log"
    (tmp_path / "j.log.lock").write_text(S.owner_id().rsplit(":", 2)[0] + f":{dead.pid}:12345")
    lock = S.owned_journal_lock(str(log))
    t0 = time.time()
    assert lock.acquire() and time.time() - t0 < 5          # not Optuna's 30 s grace period
    assert (tmp_path / "j.log.lock").read_text() == S.owner_id()
    lock.release()
    assert not (tmp_path / "j.log.lock").exists()


def test_an_interrupt_inside_ask_is_held_until_the_trial_is_ours(tmp_path, monkeypatch):
    st = S.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=st, study_name="s")
    real = optuna.Study.ask

    def ask_then_ctrl_c(self, *a, **kw):
        t = real(self, *a, **kw)
        os.kill(os.getpid(), signal.SIGINT)     # lands between the storage's insert and our bookkeeping
        time.sleep(0.05)
        return t
    monkeypatch.setattr(optuna.Study, "ask", ask_then_ctrl_c)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with S.owning(study):
                S.ask_owned(study)
    finally:
        signal.signal(signal.SIGINT, old)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


def test_deferred_interrupts_deliver_after_the_block_and_respect_an_ignored_sigint():
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append(1)
        assert done == [1]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


# ------------------------------------------------------------------------------ full disks

def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_is_not_blocked(tmp_path, monkeypatch):
    from mutransfer.run import checkpoint as C
    r = recipe(tmp_path)
    real = C.torch.save

    def torn(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 31424 vs 31376")
    monkeypatch.setattr(C.torch, "save", torn)
    res = cli(tmp_path, "scale", r, "--out", "run", "--checkpoint-every", "3")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: run/checkpoints/step-00000003.pt: "), last
    assert not list((tmp_path / "run").rglob("*.tmp")) and not list((tmp_path / "run").rglob("*.pt"))
    import fcntl
    fd = os.open(tmp_path / "run" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)       # released
    finally:
        os.close(fd)
    monkeypatch.setattr(C.torch, "save", real)
    again = cli(tmp_path, "scale", r, "--out", "run", "--checkpoint-every", "3")   # space again: it runs
    assert again.exit_code == 0, again.output
    assert (tmp_path / "run" / "checkpoints" / "step-00000006.pt").is_file()


def test_a_full_disk_under_the_sqlite_study_is_one_line_and_the_rerun_continues(tmp_path, monkeypatch):
    r = recipe(tmp_path, trials=3)
    real = optuna.storages.RDBStorage.set_trial_intermediate_value
    calls = []

    def full(self, *a, **kw):
        calls.append(1)
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from e
    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_intermediate_value", full)
    res = cli(tmp_path, "tune", r, "--parallel-trials", "1")
    line = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert line.startswith("error: --storage: sqlite:///runs/tiny/study.db: database or disk is full"), line
    url = "sqlite:///" + str(tmp_path / "runs/tiny/study.db")
    assert "RUNNING" not in states(url, "tiny")
    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_intermediate_value", real)
    again = cli(tmp_path, "tune", r, "--parallel-trials", "1")
    assert again.exit_code == 0, again.output
    s = states(url, "tiny")
    assert s.get("COMPLETE", 0) + s.get("PRUNED", 0) == 3


# ------------------------------------------------------------------------------ secrets, markup

def test_passwords_are_masked_everywhere_a_url_is_shown(tmp_path):
    r = recipe(tmp_path)
    for url in ("postgresql+psycopg2://user:s3cret@127.0.0.1:1/db", "mysql://user:s3cret@127.0.0.1:1/db"):
        res = cli(tmp_path, "tune", r, "--storage", url)
        assert res.exit_code == 2 and "s3cret" not in res.output, res.output
        assert "user:***@" in res.output or "not installed" in res.output, res.output
    assert mask_secrets("invalid dsn: host=a password=s3cret") == "invalid dsn: host=a password=***"
    assert "s3cret" not in str(UserError("--storage", "postgresql://u:s3cret@h/d"))
    assert mask_secrets("http://h:8080/a@b") == "http://h:8080/a@b"          # no password: unchanged
    from mutransfer.run.hparams_file import write_hparams_file
    p = write_hparams_file(tmp_path / "hp.yaml", recipe="r", proxy_width=8, optimizer="adamw", hparams={"lr": 0.1},
                           best_value=1.0, study="s", storage="postgresql://u:s3cret@h/d")
    assert "s3cret" not in p.read_text()


def test_the_readmes_bare_postgresql_url_uses_the_postgres_extras_driver(tmp_path):
    pytest.importorskip("psycopg2")
    r = recipe(tmp_path)
    res = cli(tmp_path, "tune", r, "--storage", "postgresql://user:s3cret@127.0.0.1:1/db")
    # the driver loads (psycopg2): what fails is the connection to a server that is not there
    assert res.exit_code == 2 and "not installed" not in res.output and "psycopg2" in res.output, res.output
    assert "s3cret" not in res.output
    if not S._module_present("psycopg"):
        assert S.driver_url("postgresql://u@h/d") == "postgresql+psycopg2://u@h/d"
        assert S.driver_url("postgres://u@h/d") == "postgresql+psycopg2://u@h/d"
    assert S.driver_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert S.driver_url("sqlite:///x.db") == "sqlite:///x.db"


from test_postgres import postgres  # noqa: E402,F401 - the fixture: a PostgreSQL server started here


def test_the_readmes_exact_url_form_runs_a_tune_on_a_real_server(tmp_path, postgres):  # noqa: F811
    url = postgres.replace("postgresql+psycopg2://", "postgresql://")       # as the README writes it
    res = cli(tmp_path, "tune", recipe(tmp_path), "--storage", url, "--trials", "1")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("text", ["x[/]", "[fc]*.weight", "[bold]b[/bold]", "a\\", "pip install 'mutransfer[wandb]'",
                                  "esc\x1b[31mred\x07", "C:\\runs\\[x]"])
def test_user_text_prints_as_written(text):
    from rich.console import Console
    c = Console(width=200, record=True, color_system=None)
    c.print("[red]error:[/] " + literal(text), highlight=False)
    shown = c.export_text().rstrip("\n")
    assert shown == "error: " + clean(text), shown
    assert "\x1b" not in clean(text) and "\x07" not in clean(text)


def test_globs_names_and_hints_keep_their_brackets(tmp_path, monkeypatch):
    r = recipe(tmp_path, factory_init=["[fc]*.weight"])
    one_line(cli(tmp_path, "tune", r), 2, "factory_init: [fc]*.weight", "matches no parameter")
    assert not (tmp_path / "runs").exists()                  # refused before study.db exists
    r = recipe(tmp_path, factory_init=["\x1b[2Jx*"])
    line = one_line(cli(tmp_path, "scale", r), 2)
    assert "\\x1b[2Jx*" in line and "\x1b" not in line
    import builtins
    real = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    one_line(cli(tmp_path, "tune", recipe(tmp_path), "--log", "wandb"), 2, "pip install 'mutransfer[wandb]'")
    res = cli(tmp_path, "tune", recipe(tmp_path, name="x"), "--study-name", "st[/]udy", "--trials", "1")
    assert res.exit_code == 0 and "study st[/]udy" in res.output, res.output


# ------------------------------------------------------------------------------ late checks

def test_a_huge_depth_is_refused_before_a_block_is_built(tmp_path):
    r = depth_recipe(tmp_path)
    t0 = time.time()
    one_line(cli(tmp_path, "scale", r, "--dry-run", "--depth", "100000000"), 2, "--depth", "100000000")
    one_line(cli(tmp_path, "tune", r, "--depth", "100000000"), 2, "--depth")
    one_line(cli(tmp_path, "sweep", r, "--depths", "2,100000000", "--lrs", "0.01"), 2, "--depths")
    assert time.time() - t0 < 60 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["coord-check", "sweep"])
def test_depth_ladders_refuse_width_zero(tmp_path, command):
    r = depth_recipe(tmp_path)
    one_line(cli(tmp_path, command, r, "--depths", "2,3", "--width", "0"), 2, "--width", "0")
    assert not (tmp_path / "runs").exists()


def test_a_muon_params_glob_matching_nothing_is_named(tmp_path):
    r = recipe(tmp_path, train={"optimizer": "muon", "muon_params": ["embed*.weight"]})
    before = snapshot(tmp_path)
    one_line(cli(tmp_path, "tune", r), 2, "train.muon_params: embed*.weight", "matches no parameter")
    one_line(cli(tmp_path, "scale", r), 2, "train.muon_params")
    assert snapshot(tmp_path) == before


def test_an_hf_depth_arg_that_is_not_a_config_field_is_named(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "t.txt").write_text("hello world, a small text read again and again\n" * 40)
    r = recipe(tmp_path, name="hfd", model={"factory": "hf:gpt2", "width_fields": {"n_embd": 1}, "depth_arg": "n_layers",
                                            "args": {"vocab_size": 256, "n_positions": 16, "n_head": 2}},
               data={"factory": "builtin:text", "args": {"seq_len": 8, "path": "t.txt"}},
               depths={"proxy": 1, "target": 2})
    before = snapshot(tmp_path)
    one_line(cli(tmp_path, "tune", r), 2, "model.depth_arg", "n_layers", "GPT2Config")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("device", ["cuda:0", "cuda", "cuda:x"])
def test_a_missing_gpu_is_refused_before_a_study_exists(tmp_path, device):
    r = recipe(tmp_path)
    one_line(cli(tmp_path, "tune", r, "--device", device), 2, "--device")
    one_line(cli(tmp_path, "scale", r, "--device", device), 2, "--device")
    assert not (tmp_path / "runs").exists()


def test_wandb_settings_are_checked_before_anything_is_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    r = recipe(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "ofline")
    one_line(cli(tmp_path, "tune", r, "--log", "wandb"), 2, "WANDB_MODE", "'ofline'")
    one_line(cli(tmp_path, "scale", r, "--log", "wandb"), 2, "WANDB_MODE")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    one_line(cli(tmp_path, "tune", r, "--log", "wandb"), 2, "WANDB_MODE", "API key")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("field,value,needle", [
    ("best_value", "low", "best_value"), ("steps", "-3", "steps"), ("proxy_depth", "1.5", "proxy_depth"),
    ("optimizer", "[1, 2]", "optimizer"),
])
def test_hparams_file_fields_are_checked_when_read(tmp_path, field, value, needle):
    r = recipe(tmp_path)
    d = {"proxy_width": 16, "optimizer": "adamw", "hparams": {"lr": 0.01}, field: yaml.safe_load(value)}
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(d))
    before = snapshot(tmp_path)
    one_line(cli(tmp_path, "scale", r, "--hparams", "hp.yaml"), 2, f"hp.yaml: {needle}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("url", ["sqlite:////proc/nope/s.db", "journal:/proc/nope/j.log"])
def test_storage_paths_that_cannot_exist(tmp_path, url):
    one_line(cli(tmp_path, "tune", recipe(tmp_path), "--storage", url), 2, "--storage", "/proc/nope")


def test_inputs_of_a_dtype_the_model_rejects_are_one_line_before_anything_is_written(tmp_path):
    sys.path.insert(0, str(HERE))
    r = recipe(tmp_path, data={"factory": "hostile_data:int_inputs", "args": {}})
    for command in ("tune", "scale"):
        one_line(cli(tmp_path, command, r), 2, "model", "int64")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ damaged run folders

@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    r = recipe(tmp, steps=2)
    res = cli(tmp, "scale", r, "--out", "run")
    assert res.exit_code == 0, res.output
    return tmp / "run"


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / "hparams.yaml").write_text("width: [1, 2\n"), "hparams.yaml:"),
    (lambda d: (d / "recipe.yaml").write_text("name: x\nmodel: {\n"), "recipe.yaml"),
    (lambda d: (d / "hparams.yaml").write_text("proxy_width: 16\nhparams: {}\n"), "hparams.yaml: width"),
    (lambda d: (d / "hparams.yaml").write_text("width: 64\nproxy_width: 16\nhparams: {}\n"), "edited?"),
    (lambda d: (d / "hparams.yaml").write_text("width: !!python/object/apply:os.system ['touch pwned']\n"),
     "hparams.yaml"),
    (lambda d: (d / "hparams.yaml").write_text("width: 32\nproxy_width: 16\nhparams: {lr: -1}\n"), "hparams.lr"),
    (lambda d: __import__("torch").save({"step": 1}, d / "checkpoints" / "step-00000099.pt"), "no model state"),
])
def test_damaged_run_folders_are_one_line_and_nothing_is_written(tmp_path, scale_run, damage, needle):
    import shutil

    import mutransfer
    run = tmp_path / "run"
    shutil.copytree(scale_run, run)
    damage(run)
    with pytest.raises(UserError) as e:
        mutransfer.load(run)
    assert needle in str(e.value), e.value
    one_line(cli(tmp_path, "export", run, "out"), 2, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_export_into_the_run_folder_is_refused(tmp_path, scale_run):
    before = snapshot(scale_run)
    for out in (scale_run, scale_run / "checkpoints", scale_run / "sub" / ".."):
        one_line(cli(tmp_path, "export", scale_run, out), 2, "OUT", "inside the run folder")
    assert snapshot(scale_run) == before
