"""Torch's intra-op threads from the CPUs this process may actually use (its affinity mask: a cgroup,
taskset, a cluster's allocation), divided among the worker processes of one command, so several
processes never oversubscribe the cores. OMP_NUM_THREADS, when set, is the user's choice and wins."""
from __future__ import annotations

import os
from typing import Optional

from .signals import available_cpus


def choose(workers: int = 1, explicit: Optional[int] = None) -> int:
    """Threads per process: `explicit` (--threads), else OMP_NUM_THREADS, else available CPUs / workers."""
    if explicit:
        return max(1, int(explicit))
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_cpus() // max(1, workers))


def configure(workers: int = 1, explicit: Optional[int] = None) -> int:
    """Set torch's threads for this process. Without `explicit`, only ever *lowers* the count (torch's
    default is the machine's cores, which oversubscribes a process restricted to fewer): a count the
    caller chose (a library user, a test, OMP_NUM_THREADS) is never raised."""
    import torch

    n = choose(workers, explicit)
    if explicit or torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
