"""Where a tune study lives: opening Optuna storages, failing trials left running by dead workers, and
counting finished trials. No training here (that is tune.py).

Storages:
  sqlite:///runs/<name>/study.db (the default), postgresql://..., mysql://...  -> Optuna's RDBStorage with
      its heartbeat: every running trial refreshes a timestamp; a trial whose timestamp is older than the
      grace period belongs to a dead process and is marked FAIL before the next trial starts.
  journal:PATH  -> Optuna's JournalStorage on a file (no database server; safe for processes sharing a
      file system). It has no native heartbeat, so the same rule is kept here with a user attribute
      refreshed by a background thread (see Heartbeat).
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import optuna
from optuna.trial import TrialState

from ..errors import UserError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_ATTR = "heartbeat"          # wall-clock time (s) of a journal trial's last sign of life


def default_storage(name: str, runs_dir: str | Path = "runs") -> str:
    return f"sqlite:///{Path(runs_dir) / name / 'study.db'}"


def is_journal(url: str) -> bool:
    return url.startswith("journal:")


def journal_path(url: str) -> Path:
    """journal:PATH or journal:///ABSOLUTE/PATH -> the file."""
    rest = url[len("journal:"):]
    if rest.startswith("///"):
        rest = rest[2:]
    elif rest.startswith("//"):
        rest = rest[2:]
    return Path(rest)


def storage_file(url: str) -> Optional[Path]:
    """The file behind a local storage URL (sqlite or journal), else None."""
    if is_journal(url):
        return journal_path(url)
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None


@contextlib.contextmanager
def storage_lock(url: str, timeout: float = 120.0):
    """An exclusive lock while a study is created or checked in a local file storage, so that two
    tunes started at the same moment on a new SQLite file do not both create its tables."""
    path = storage_file(url)
    if path is None:
        yield
        return
    import fcntl
    import os
    path.parent.mkdir(parents=True, exist_ok=True)
    # not PATH.lock: Optuna's JournalFileOpenLock uses that name and waits while it exists
    fd = os.open(str(path) + ".create-lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    raise UserError("--storage", f"{path} is locked by another process for over {timeout:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def release_connections(study) -> None:
    """Roll back and close this process's connections to an RDB storage (no-op for journals)."""
    st = getattr(study, "_storage", None)
    st = getattr(st, "_backend", st)        # optuna wraps RDB storages in a cache
    engine = getattr(st, "engine", None)
    if engine is not None:
        try:
            st.scoped_session.remove()
        except Exception:  # noqa: BLE001
            pass
        engine.dispose()


def repair_journal(path: Path) -> int:
    """A journal whose last write was torn (disk full, a killed process) ends in a partial line;
    Optuna then fails on every later read. Cut the file back to its last complete JSON line before
    anyone appends. Returns the number of bytes removed."""
    import json
    import os
    try:
        size = path.stat().st_size
    except OSError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb") as f:
        data = f.read()
    good = len(data)
    if not data.endswith(b"\n"):
        good = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:])
        except ValueError:
            good = last_start
    if good == len(data):
        return 0
    with open(path, "r+b") as f:
        f.truncate(good)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - good


def check_journal_file(path: Path) -> None:
    """A journal must be empty or JSON lines: refuse a YAML file, an SQLite database, a recipe."""
    import json
    if not path.exists():
        return
    if path.is_dir():
        raise UserError("--storage", f"{str(path)!r} is a directory, not a journal file")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise UserError("--storage", f"cannot read journal file {str(path)!r}: {e}") from None
    if not head:
        return
    first = head.split(b"\n", 1)[0]
    try:
        ok = isinstance(json.loads(first), dict)
    except ValueError:
        ok = False
    if not ok:
        raise UserError("--storage", f"{str(path)!r} is not an Optuna journal (its first line is not a JSON "
                        "object); refusing to append to it")


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: Optional[int] = None):
    """The Optuna storage behind `url`; UserError('--storage', ...) when it cannot be opened."""
    grace = grace_period or 3 * heartbeat_interval
    if is_journal(url):
        path = journal_path(url)
        if not path.name:
            raise UserError("--storage", f"{url!r}: a journal storage needs a file path (journal:PATH)")
        check_journal_file(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            repair_journal(path)
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
            return optuna.storages.JournalStorage(backend)
        except OSError as e:
            raise UserError("--storage", f"cannot open journal file {str(path)!r}: {e}") from None
    if "://" not in url:
        raise UserError("--storage", f"{url!r} is not a storage URL (sqlite:///PATH, postgresql://..., "
                                     "mysql://..., journal:PATH)")
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError("--storage", f"cannot create the directory of {str(db)!r}: {e}") from None
        engine_kwargs = {"connect_args": {"timeout": 60}}   # concurrent local workers wait for the lock
    for attempt in range(8):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace)
        except ImportError as e:
            raise UserError("--storage", f"the driver for {url.split(':', 1)[0]!r} is not installed ({e})") from None
        except Exception as e:  # noqa: BLE001 - sqlalchemy's many URL / connection errors
            # two processes creating the schema of a new database at once (a server: no file to lock):
            # the loser sees "already exists" / a unique violation; the tables are there on a retry
            if attempt < 7 and creation_race(e):
                time.sleep(0.2 + random.random() * 0.5 * (attempt + 1))
                continue
            raise UserError("--storage", f"cannot open {url!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def creation_race(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(k in text for k in ("already exists", "uniqueviolation", "duplicate key", "unique constraint"))


def backend(study: optuna.Study):
    """The storage itself (a loaded study wraps an RDBStorage in Optuna's cache layer)."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def is_rdb(study: optuna.Study) -> bool:
    return isinstance(backend(study), optuna.storages.RDBStorage)


def count_finished(study: optuna.Study) -> int:
    """Finished trials: COMPLETE (a diverged trial is complete, with its penalty) or PRUNED."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def fail_stale(study: optuna.Study, grace_period: float) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker died; returns their numbers.

    RDB storages use Optuna's heartbeat table; journal storages the HEARTBEAT_ATTR user attribute
    (a running trial with no heartbeat at all counts from its start time)."""
    storage = study._storage
    if is_rdb(study):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        return sorted(before - after)
    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.user_attrs.get(HEARTBEAT_ATTR)
        if beat is None and t.datetime_start is not None:
            beat = t.datetime_start.timestamp()
        if beat is not None and now - float(beat) > grace_period:
            try:
                if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    failed.append(t.number)
            except (RuntimeError, ValueError):   # another worker finished or failed it first
                pass
    return failed


class Heartbeat:
    """Signs of life for running trials while this process trains them, every `interval` seconds from
    a background thread: RDB storages record Optuna's heartbeat (which study.optimize would do, but
    trials asked for with ask() get none), journal storages refresh HEARTBEAT_ATTR."""

    def __init__(self, study: optuna.Study, trial_ids, interval: float):
        self.study, self.trial_ids, self.interval = study, list(trial_ids), interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rdb = is_rdb(study)

    def __enter__(self) -> "Heartbeat":
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def add(self, trial_id: int) -> None:
        """One more trial to keep alive (a trial that joined a running group), with a first beat now:
        a trial whose worker dies before any beat would never look stale to Optuna's RDB rule."""
        self.trial_ids.append(trial_id)
        self._beat([trial_id])

    def _beat(self, ids=None) -> None:
        for tid in list(self.trial_ids if ids is None else ids):
            try:
                if self._rdb:
                    backend(self.study).record_heartbeat(tid)
                else:
                    self.study._storage.set_trial_user_attr(tid, HEARTBEAT_ATTR, time.time())
            except Exception:  # noqa: BLE001 - the trial may just have finished; a missed beat is harmless
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
