"""Signals, one policy for every command: SIGTERM always stops the work as Ctrl-C does (the run
checkpoints or keeps its finished trials, exit 130); SIGINT does the same unless the process
inherited it as ignored (the shell's convention for background jobs: `cmd &`), which is respected.
Worker processes die with their parent (Linux: PR_SET_PDEATHSIG), so a killed parent leaves no
orphans."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading


def _raise(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_raises():
    """While inside: SIGTERM raises KeyboardInterrupt in the main thread (as SIGINT does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def sigint_ignored() -> bool:
    """True when SIGINT was inherited as ignored (a background job) and must stay so."""
    try:
        return signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    except (ValueError, TypeError):
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; no-op elsewhere),
    and exit at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, int(sig), 0, 0, 0)          # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() == 1:
        os._exit(130)


def worker_signals() -> None:
    """In a spawned worker: SIGTERM raises KeyboardInterrupt, and the worker dies with its parent."""
    signal.signal(signal.SIGTERM, _raise)
    die_with_parent()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a cgroup or taskset), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def deferred_interrupts():
    """While inside, SIGINT and SIGTERM are held back and delivered when the block ends: for the few
    storage writes that must not be cut in two (a trial asked for but not yet recorded as ours would
    stay RUNNING for ever). Delivered = the handler that was in place is called (a KeyboardInterrupt
    for Ctrl-C), or the default action is taken. Outside the main thread: no effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        h = signal.getsignal(s)
        if h is signal.SIG_IGN or h is None:      # ignored (a background job) or not set from Python: leave it
            continue
        old[s] = h
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            s = got[0]
            h = old[s]
            if callable(h):
                h(s, None)
            else:                                 # SIG_DFL: the default action, now that it is back
                os.kill(os.getpid(), s)
