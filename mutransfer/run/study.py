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
OWNER_ATTR = "owner"                  # host/boot, pid and start time of the process that trains the trial


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
    # not PATH.lock: Optuna's JournalFileOpenLock uses that name and waits while it exists
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(path) + ".create-lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError("--storage", f"cannot create the storage file {str(path)!r} there: "
                                     f"{e.strerror or e}") from None
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


def _module_present(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def driver_url(url: str) -> str:
    """The URL SQLAlchemy is given. `postgresql://` (the README's form) and `postgres://` name no
    driver; SQLAlchemy 2 then picks psycopg 3, while `mutransfer[postgres]` installs psycopg2 (binary
    wheels everywhere, the driver the tests use). So a bare scheme means psycopg2 when psycopg 3 is
    absent and psycopg2 present; an explicit `postgresql+DRIVER://` is left as written."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        if _module_present("psycopg2") and not _module_present("psycopg"):
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


# a server that does not answer: the connection attempt gives up after this many seconds
CONNECT_TIMEOUT_S = 20


def uninterrupted(storage):
    """The storage with every public method run under deferred_interrupts: a Ctrl-C or SIGTERM never
    lands inside a database call. (One that did could leave a connection holding SQLite's lock, held
    alive by the traceback, and every later write of this process - marking its trials FAIL - then
    waited for it: the workers of an interrupted tune hung.) The object keeps its class, so Optuna
    sees the storage it expects."""
    import functools

    from ..signals import deferred_interrupts

    def wrap(fn):
        @functools.wraps(fn)
        def call(*a, **kw):
            with deferred_interrupts():
                return fn(*a, **kw)
        return call
    for name in dir(type(storage)):
        if name.startswith("_") or name in ("engine", "scoped_session", "url"):
            continue
        attr = getattr(type(storage), name, None)
        if callable(attr) and not isinstance(attr, (staticmethod, classmethod, type, property)):
            setattr(storage, name, wrap(getattr(storage, name)))
    return storage


def owned_journal_lock(path: str):
    """Optuna's journal lock (PATH.lock, made with O_EXCL, so it works on NFS) that records its owner
    in the file: a lock left by a killed process of this machine is taken over at once instead of
    after Optuna's 30 s grace period (which still applies to owners elsewhere or unknown)."""
    import os

    from optuna.storages.journal import JournalFileOpenLock

    class OwnedLock(JournalFileOpenLock):
        def acquire(self) -> bool:
            for _ in range(100):
                try:
                    fd = os.open(self._lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    if not self._take_over_dead():
                        return super().acquire()      # a live or unknown owner: Optuna's wait
                    continue
                try:
                    os.write(fd, owner_id().encode())
                finally:
                    os.close(fd)
                return True
            return super().acquire()

        def _take_over_dead(self) -> bool:
            try:
                with open(self._lock_file) as f:
                    owner = f.read()
            except OSError:
                return True                        # released meanwhile: try again
            if not owner_dead(owner):
                return False
            aside = f"{self._lock_file}.{os.getpid()}.dead"
            try:
                os.rename(self._lock_file, aside)
                with open(aside) as f:
                    still = f.read() == owner
                if still:
                    os.unlink(aside)
                else:                              # another process's fresh lock: put it back
                    os.rename(aside, self._lock_file)
            except OSError:
                pass
            return True

    return OwnedLock(path)


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
            from optuna.storages.journal import JournalFileBackend

            backend = JournalFileBackend(str(path), lock_obj=owned_journal_lock(str(path)))
            return uninterrupted(optuna.storages.JournalStorage(backend))
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
    elif url.startswith(("postgresql", "postgres:")):
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    elif url.startswith("mysql"):
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    sa_url = driver_url(url)
    for attempt in range(8):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return uninterrupted(optuna.storages.RDBStorage(sa_url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace))
        except ImportError as e:
            scheme = sa_url.split(":", 1)[0]
            hint = (" (pip install 'mutransfer[postgres]' for psycopg2, or name the driver: postgresql+psycopg://)"
                    if scheme.startswith("postgres") else "")
            raise UserError("--storage", f"the driver for {scheme!r} is not installed{hint} ({e})") from None
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


def _fail(study: optuna.Study, trial_id: int) -> bool:
    try:
        return bool(study._storage.set_trial_state_values(trial_id, TrialState.FAIL))
    except (RuntimeError, ValueError):   # another worker finished or failed it first
        return False


def fail_stale(study: optuna.Study, grace_period: float) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker died; returns their numbers.

    At once: a trial whose owner (OWNER_ATTR) is a process of this machine that no longer exists (a
    Ctrl-C, SIGTERM or SIGKILL of an earlier run). After `grace_period` without a sign of life: RDB
    storages by Optuna's heartbeat table (a trial that never beat counts from its start), journal
    storages by the HEARTBEAT_ATTR user attribute (or the start time)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    failed = [t.number for t in running if owner_dead(t.user_attrs.get(OWNER_ATTR)) and _fail(study, t._trial_id)]
    running = [t for t in running if t.number not in failed]
    if not running:
        return failed
    now = time.time()
    if is_rdb(study):
        before = {t.number for t in running}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        failed += sorted(before - after)
        beaten = _have_heartbeat(study, [t._trial_id for t in running if t.number in after])
        for t in running:                  # Optuna's rule skips a trial that died before its first beat
            if (t.number in after and beaten is not None and t._trial_id not in beaten
                    and t.datetime_start is not None and now - t.datetime_start.timestamp() > grace_period
                    and _fail(study, t._trial_id)):
                failed.append(t.number)
        return sorted(failed)
    for t in running:
        beat = t.user_attrs.get(HEARTBEAT_ATTR)
        if beat is None and t.datetime_start is not None:
            beat = t.datetime_start.timestamp()
        if beat is not None and now - float(beat) > grace_period and _fail(study, t._trial_id):
            failed.append(t.number)
    return sorted(failed)


def _have_heartbeat(study: optuna.Study, trial_ids: list[int]) -> Optional[set[int]]:
    """Which of these RDB trials have a heartbeat row (None when Optuna's tables cannot be read so)."""
    if not trial_ids:
        return set()
    try:
        from optuna.storages._rdb import models
        st = backend(study)
        session = st.scoped_session()
        try:
            rows = session.query(models.TrialHeartbeatModel.trial_id).filter(
                models.TrialHeartbeatModel.trial_id.in_(trial_ids)).all()
            return {r[0] for r in rows}
        finally:
            st.scoped_session.remove()
    except Exception:  # noqa: BLE001 - another Optuna version: keep to its own rule
        return None


# ---------------------------------------------------------------- owned trials ---------------------------

def _start_ticks(pid: int) -> Optional[str]:
    """A process's start time (clock ticks since boot, Linux /proc); None when unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _machine() -> str:
    import socket
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


def owner_id() -> str:
    """This process, as recorded on the trials it trains: machine (host and boot), pid, start time."""
    import os
    pid = os.getpid()
    return f"{_machine()}:{pid}:{_start_ticks(pid) or ''}"


def owner_dead(owner) -> bool:
    """True when `owner` (an owner_id) names a process of this machine that no longer exists."""
    import os
    if not isinstance(owner, str) or owner.count(":") < 2:
        return False
    machine, pid_s, ticks = owner.rsplit(":", 2)
    if machine != _machine() or not pid_s.isdigit():
        return False
    pid = int(pid_s)
    if ticks:
        now = _start_ticks(pid)
        if now is not None or os.path.isdir("/proc"):
            return now != ticks           # gone, or the pid now belongs to another process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


_OWNED: dict[int, tuple[optuna.Study, set[int]]] = {}


def ask_owned(study: optuna.Study) -> optuna.Trial:
    """study.ask(), with the new trial recorded as this process's (OWNER_ATTR, and a first heartbeat on
    RDB storages) before a Ctrl-C or SIGTERM can land: such a trial is failed by `owning` when this
    process stops, and by any later run's fail_stale if it was killed outright."""
    from ..signals import deferred_interrupts
    with deferred_interrupts():
        trial = study.ask()
        _OWNED.setdefault(id(study), (study, set()))[1].add(trial._trial_id)
        try:
            study._storage.set_trial_user_attr(trial._trial_id, OWNER_ATTR, owner_id())
            if is_rdb(study):
                backend(study).record_heartbeat(trial._trial_id)
        except Exception:  # noqa: BLE001 - a storage failure surfaces at the trial's first real write
            pass
    return trial


def fail_owned(study: optuna.Study) -> list[int]:
    """FAIL every trial this process asked for in `study` that is still RUNNING; their numbers."""
    _, ids = _OWNED.pop(id(study), (study, set()))
    if not ids:
        return []
    failed = []
    try:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id in ids and _fail(study, t._trial_id):
                failed.append(t.number)
    except Exception:  # noqa: BLE001 - the storage itself failed: a later run fails them (owner_dead)
        pass
    return failed


_DB_FAULTS = ("database or disk is full", "disk i/o error", "readonly database", "unable to open database file",
              "no space left", "disk quota", "read-only file system")


def storage_fault(e: BaseException) -> Optional[str]:
    """What went wrong, in a few words, when `e` (or what caused it) is the storage's disk or file
    failing: full, read-only, unreadable; None for any other error."""
    import errno
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            return e.strerror or str(e)
        text = str(e).lower()
        for k in _DB_FAULTS:
            if k in text:
                return k
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def owning(study: optuna.Study, url: Optional[str] = None):
    """While inside, trials asked with ask_owned are this block's: however it ends (an interrupt, an
    error, a normal return), those still RUNNING are marked FAIL, so that no rerun waits for them.
    A storage whose disk fails (full, read-only) becomes one UserError naming `url`."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only the storage's disk faults are translated
        why = storage_fault(e) if url is not None else None
        if why is None or isinstance(e, UserError):
            raise
        raise UserError("--storage", f"{url}: {why}; every finished trial is kept, rerun to continue once "
                                     "there is room") from None
    finally:
        from ..signals import deferred_interrupts
        with deferred_interrupts():        # a second Ctrl-C must not cut the clean-up short
            fail_owned(study)


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
