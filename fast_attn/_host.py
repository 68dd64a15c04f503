"""Facts about the host CPU that more than one tool needs (the training demo, the benchmarks)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def idle_cores(local_ranks: int = 1) -> int:
    """torch threads for one of ``local_ranks`` CPU processes: the usable cores less the
    rounded 1-minute load average, split among the ranks; at least 1.

    OpenMP threads on oversubscribed cores wait on each other: on a 2-core machine at load
    3, a 0.3 ms op measured ~50 ms with 2 threads, and the training demo ran 10x slower
    than with one thread (2026-12-07), while on an idle machine a second thread gained
    only 15% for the demo's small models.
    """
    cores = usable_cores()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0
    return max(1, min(cores, cores - busy) // max(1, local_ranks))
