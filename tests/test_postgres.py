"""Many machines on one database: `tune` workers sharing a study in a real PostgreSQL server, started
here (initdb as an unprivileged user, a Unix socket, no TCP). Skipped cleanly where no server can be
started (no PostgreSQL binaries, no psycopg2, not root and no way to drop privileges)."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _bin(name: str):
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)


@pytest.fixture()
def postgres():
    pytest.importorskip("psycopg2")
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = tempfile.mkdtemp(prefix="mt-pg-", dir="/tmp")
    os.chmod(root, 0o777)
    user = os.environ.get("USER", "")
    as_user: list[str] = []
    if os.geteuid() == 0:                    # initdb refuses root: run the server as `nobody`
        runuser = shutil.which("runuser")
        if not runuser:
            pytest.skip("running as root without runuser to start PostgreSQL unprivileged")
        as_user, user = [runuser, "-u", "nobody", "--"], "nobody"
        shutil.chown(root, user="nobody")
    data, sock = f"{root}/data", f"{root}/sock"
    os.mkdir(sock)
    os.chmod(sock, 0o777)

    def run(*cmd):
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
    if run(initdb, "-D", data, "-A", "trust", "-U", user or "postgres").returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip("initdb failed here")
    started = run(pg_ctl, "-D", data, "-o", f"-k {sock} -c listen_addresses=''", "-l", f"{root}/log", "-w", "start")
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server did not start: {started.stderr[-200:]}")
    try:
        createdb = _bin("createdb")
        assert run(createdb, "-h", sock, "-U", user or "postgres", "mt").returncode == 0
        yield f"postgresql+psycopg2://{user or 'postgres'}@/mt?host={sock}"
    finally:
        run(pg_ctl, "-D", data, "stop", "-m", "fast")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("group", [1, 3])
def test_workers_share_one_postgresql_study(tmp_path, postgres, group):
    """K processes on one database, each training `group` trials at a time (--parallel-trials)."""
    import optuna
    from optuna.trial import TrialState

    N, K = 6, 2
    r = {"name": "pg", "model": {"factory": "builtin:mlp", "args": {"in_dim": 8, "out_dim": 4}},
         "data": {"factory": "builtin:vectors", "args": {"dim": 8, "classes": 4}},
         "widths": {"proxy": 16, "target": 32},
         "train": {"optimizer": "adamw", "lr": 1e-2, "steps": 30, "batch_size": 8, "eval_batches": 1},
         "search": {"trials": N, "sampler_seed": 0, "heartbeat": 2,
                    "params": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # two "machines": two tune processes, each with its own worker, on one database
    procs = [subprocess.Popen([sys.executable, "-m", "mutransfer.cli", "tune", "r.yaml", "--storage", postgres,
                               "--out", f"hp{i}.yaml", "--parallel-trials", str(group), "--device", "cpu"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(K)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    trials = optuna.load_study(study_name="pg", storage=postgres).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert N <= finished <= N + K - 1
    assert max(t.user_attrs.get("parallel_trials", 0) for t in trials) == group
    assert (tmp_path / "hp0.yaml").is_file() and (tmp_path / "hp1.yaml").is_file()
