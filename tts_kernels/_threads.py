"""How many threads a search may use: the CPUs the process may run on, less what others are using.

torch's intra-op pool (OpenMP; the extension's kernels run on the same one) is sized from the
machine's cores by default, and its threads spin at every barrier before they sleep. Both go
wrong on a shared machine:

* in a container with a CPU quota, or with a restricted affinity mask, the pool is larger than
  the CPUs the process may use, so its threads take turns on the same CPUs;
* beside a busy process, one of our threads is descheduled while the other spins at the next
  barrier, and a decode step is hundreds of small parallel regions, each of which now waits for
  a time slice. Measured here (2 cores, ``benchmarks/bench_contention.py``): best-of-N decode of
  the bundled policy took 7.6x longer beside one spinning process with 2 threads, 1.0x with 1.

So :func:`available_cpus` takes the affinity mask and the cgroup quota (v2 ``cpu.max``, v1
``cpu.cfs_quota_us``) into account, and :func:`search_threads` subtracts the CPUs other processes
used since the last look (``/proc/stat`` less this process's own CPU time; Linux only,
elsewhere nothing is subtracted). :func:`search_pool` applies that to torch's pool for the
length of a search (never more threads than the caller had) and restores it after, so a search
beside a busy neighbour runs on the CPUs that are free instead of waiting on the ones that are not.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
import threading
import time
from pathlib import Path

import torch

_CGROUP = Path("/sys/fs/cgroup")
_SAMPLE_S = 0.02  # the first look has no earlier snapshot: measure this long
_STALE_S = 5.0    # an older snapshot says little about now: measure afresh
_last: tuple[float, float, float] | None = None  # (wall, busy CPU seconds of the machine, own CPU seconds)
_pool = threading.local()  # .before: the pool size the innermost search_pool of this thread started from


def cpu_quota(root: Path = _CGROUP) -> float | None:
    """CPUs the cgroup quota allows (e.g. ``1.5``), or ``None`` when there is no quota."""
    try:  # cgroup v2
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(root: Path = _CGROUP) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cpu_quota(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have been busy (not idle or iowait), summed over CPUs."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / ticks


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _snapshot() -> tuple[float, float, float] | None:
    busy = _machine_busy_seconds()
    return None if busy is None else (time.monotonic(), busy, _own_seconds())


def others_busy() -> float:
    """CPUs other processes kept busy since the last call (or over a short sample on the first):
    the machine's busy time less this process's, per second of wall time. 0 where unknown."""
    global _last
    now = _snapshot()
    if now is None:
        return 0.0
    if _last is None or now[0] - _last[0] > _STALE_S:
        time.sleep(_SAMPLE_S)
        _last, now = now, _snapshot()
    (t0, b0, o0), (t1, b1, o1) = _last, now
    _last = now
    wall = t1 - t0
    if wall <= 0:
        return 0.0
    return max(0.0, ((b1 - b0) - (o1 - o0)) / wall)


def search_threads(limit: int | None = None) -> int:
    """Threads for a search now: the available CPUs less those others keep busy (rounded to the
    nearest whole CPU), at least 1, at most ``limit`` (default: torch's current pool size)."""
    limit = torch.get_num_threads() if limit is None else limit
    cpus = available_cpus()
    return max(1, min(limit, cpus, int(math.floor(cpus - others_busy() + 0.5))))


def configure_pool() -> int:
    """At import: shrink torch's pool to :func:`available_cpus` when it is larger (torch sizes it from
    the affinity mask but not from a cgroup quota). ``OMP_NUM_THREADS`` or ``TTS_KERNELS_THREADS=fixed``
    leave it alone. Returns the pool size."""
    if "OMP_NUM_THREADS" not in os.environ and os.environ.get("TTS_KERNELS_THREADS") != "fixed":
        n = available_cpus()
        if torch.get_num_threads() > n:
            torch.set_num_threads(n)
    return torch.get_num_threads()


def _python_threads_cpu(skip: int) -> float:
    """CPU seconds of this process's Python threads other than thread ``skip`` (an ``ident``); 0 where the
    per-thread clocks are not available."""
    total = 0.0
    for t in threading.enumerate():
        if t.ident is None or t.ident == skip:
            continue
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (AttributeError, OSError, ValueError):
            continue
    return total


class PoolTuner:
    """Keeps a long search's thread count right as the load changes under it: :func:`search_pool` sizes the pool
    once, at the start, which is enough for a search of a second or two but not for one that runs as long as
    requests keep joining (the server's continuous batching), beside request handling that comes and goes.

    :meth:`tick` (called by the search thread at its host looks; at most every ``every`` seconds it does
    anything) measures the CPUs everything else used since the last tick: the machine's busy time less the
    search's, where the search is this process less its *other* Python threads (an HTTP server's in the
    same process included; torch's worker threads are not Python threads, so they count as the search).
    It sets torch's pool to the CPUs left, within ``1 .. limit``. A no-op under ``TTS_KERNELS_THREADS=fixed``."""

    def __init__(self, limit: int | None = None, every: float = 0.25):
        # default: the pool the enclosing search_pool started from (before it shrank it), else the pool now
        self.limit = (getattr(_pool, "before", None) or torch.get_num_threads()) if limit is None else limit
        self.every = every
        self.fixed = os.environ.get("TTS_KERNELS_THREADS") == "fixed"
        self.me = threading.get_ident()
        self._last = None if self.fixed else self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        busy = _machine_busy_seconds()
        if busy is None:
            return None
        return time.monotonic(), busy, _own_seconds() - _python_threads_cpu(self.me)

    def tick(self) -> int:
        """Resize the pool if the load changed; returns the pool size."""
        if self.fixed or self._last is None or time.monotonic() - self._last[0] < self.every:
            return torch.get_num_threads()
        now = self._sample()
        if now is None:
            return torch.get_num_threads()
        (t0, b0, s0), (t1, b1, s1) = self._last, now
        self._last = now
        others = max(0.0, ((b1 - b0) - (s1 - s0)) / max(t1 - t0, 1e-9))
        cpus = available_cpus()
        n = max(1, min(self.limit, cpus, int(math.floor(cpus - others + 0.5))))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        return n


@contextlib.contextmanager
def search_pool():
    """Run the body with torch's intra-op pool sized by :func:`search_threads`, then restore it.
    ``TTS_KERNELS_THREADS=fixed`` leaves the pool alone (for measuring, or for runs that must be
    bit-identical whatever the load). The pool is process-wide: searches running at the same time
    on several Python threads would resize it under each other (the engine runs one search loop)."""
    if os.environ.get("TTS_KERNELS_THREADS") == "fixed":
        yield torch.get_num_threads()
        return
    before = torch.get_num_threads()
    n = search_threads(before)
    if n != before:
        torch.set_num_threads(n)
    outer, _pool.before = getattr(_pool, "before", None), before
    try:
        yield n
    finally:
        _pool.before = outer
        if torch.get_num_threads() != before:  # (a PoolTuner may have resized it since)
            torch.set_num_threads(before)


def in_search_pool(fn):
    """Decorator: each call of ``fn`` (a search's decode loop) runs inside :func:`search_pool`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with search_pool():
            return fn(*args, **kwargs)
    return wrapper
