"""Thread pools sized from what the process may use and what others leave free (tts_kernels._threads).

Speed is measured in benchmarks/bench_contention.py, not here; these tests check the decisions."""
import subprocess
import sys
import time

import pytest
import torch

from tts_kernels import _threads


def _cgroup(tmp_path, v2=None, v1=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(str(v1[0]))
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(str(v1[1]))
    return tmp_path


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    assert _threads.cpu_quota(_cgroup(tmp_path / "a", v2="150000 100000\n")) == 1.5
    assert _threads.cpu_quota(_cgroup(tmp_path / "b", v2="max 100000\n")) is None
    assert _threads.cpu_quota(_cgroup(tmp_path / "c", v1=(50000, 100000))) == 0.5
    assert _threads.cpu_quota(_cgroup(tmp_path / "d", v1=(-1, 100000))) is None
    (tmp_path / "e").mkdir()
    assert _threads.cpu_quota(tmp_path / "e") is None


@pytest.mark.parametrize("affinity,quota,want", [(8, None, 8), (8, "150000 100000", 2), (8, "50000 100000", 1),
                                                 (2, "800000 100000", 2)])
def test_available_cpus_takes_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch, affinity, quota, want):
    monkeypatch.setattr(_threads.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    root = _cgroup(tmp_path, v2=quota) if quota else tmp_path
    assert _threads.available_cpus(root) == want


@pytest.mark.parametrize("others,limit,want", [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (2.0, 2, 1),
                                               (0.0, 1, 1), (1.0, 4, 3)])
def test_search_threads_leave_out_what_others_use(monkeypatch, others, limit, want):
    monkeypatch.setattr(_threads, "available_cpus", lambda root=None: 4 if limit == 4 else 2)
    monkeypatch.setattr(_threads, "others_busy", lambda: others)
    assert _threads.search_threads(limit) == want


def test_search_pool_shrinks_then_restores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(_threads, "search_threads", lambda limit=None: 1)
    with _threads.search_pool() as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("TTS_KERNELS_THREADS", "fixed")
    with _threads.search_pool() as n:
        assert n == before and torch.get_num_threads() == before


def test_configure_pool_caps_at_the_quota(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(_threads, "available_cpus", lambda root=None: 1)
        assert _threads.configure_pool() == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's explicit choice stands
        assert _threads.configure_pool() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_others_busy_sees_a_spinning_neighbour():
    _threads.others_busy()  # snapshot
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        _threads.others_busy()  # from here the neighbour runs for the whole window
        time.sleep(0.5)
        assert _threads.others_busy() > 0.6  # one spinning process is about one CPU
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.models
def test_search_results_do_not_depend_on_the_pool_size(monkeypatch):
    # The pool may shrink under load; on the bundled task that changes no bit (MKL and ATen give the
    # same results for 1 and 2 threads at these shapes). A bigger model may differ in the last bits:
    # TTS_KERNELS_THREADS=fixed pins the pool (docs/DESIGN.md).
    from tts_kernels import bundled
    from tts_kernels.search import run

    monkeypatch.setenv("TTS_KERNELS_THREADS", "fixed")
    policy, verifier = bundled.load_policy("small"), bundled.load_verifier("likelihood")
    prompts = [p.prompt for p in bundled.test_problems(6)]
    before, got = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append([[(c.text, c.score) for c in cs] for name in ("best_of_n", "dvts")
                        for cs in run(name, policy, verifier, prompts, budget=4, seed=0).candidates])
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1]


def test_contention_benchmark_runs_quick():
    from tts_kernels.bench.contention import run

    rows = run(("default", "fixed pool"), prompts=2, n=2, tokens=8, rounds=1)
    assert [r["config"] for r in rows] == ["default", "fixed pool"]
    for r in rows:
        assert r["alone_s"] > 0 and r["busy_s"] > 0 and r["slowdown"] == r["busy_s"] / r["alone_s"]
        assert r["alone_tok_s"] > 0 and "2 prompts x 2 samples" in r["workload"]


def test_pool_tuner_follows_the_load_within_its_limit(monkeypatch):
    """The tuner of a long search (continuous batching): every tick past its interval it sets the pool to the CPUs
    that everything but the search left free in that interval (the machine's busy time less the search's), within
    1 .. the pool the search started from; between ticks, and under TTS_KERNELS_THREADS=fixed, it does nothing."""
    before = torch.get_num_threads()
    clock = {"t": 100.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(_threads.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(_threads, "_machine_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(_threads, "_own_seconds", lambda: clock["own"])
    monkeypatch.setattr(_threads, "_python_threads_cpu", lambda skip: 0.0)
    monkeypatch.setattr(_threads, "available_cpus", lambda root=None: 2)
    monkeypatch.delenv("TTS_KERNELS_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        tuner = _threads.PoolTuner(limit=2, every=0.25)

        def tick(dt, busy, own):
            clock["t"] += dt
            clock["busy"] += busy
            clock["own"] += own
            return tuner.tick()

        assert tick(1.0, 2.0, 1.9) == 2  # the search had the machine: others 0.1 CPU
        assert tick(1.0, 2.0, 1.0) == 1  # others kept one CPU busy
        assert torch.get_num_threads() == 1
        assert tick(0.1, 0.2, 0.2) == 1  # within the interval: nothing measured, nothing changed
        assert tick(1.0, 1.0, 1.0) == 2  # the neighbour left; never past the limit
        assert tick(1.0, 2.0, 0.0) == 1  # fully busy elsewhere: still one thread
        monkeypatch.setenv("TTS_KERNELS_THREADS", "fixed")
        fixed = _threads.PoolTuner(limit=2)
        torch.set_num_threads(2)
        clock["t"] += 10
        clock["busy"] += 20
        assert fixed.tick() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_pool_tuner_counts_other_python_threads_of_this_process_as_load():
    """A Python thread spinning in this process (what a server's request handling is to its search thread) is
    load: it is left out of the search's own CPU time."""
    import threading

    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        me = threading.get_ident()
        a = _threads._python_threads_cpu(me)
        time.sleep(0.3)
        assert _threads._python_threads_cpu(me) - a > 0.05
    finally:
        stop.set()
        t.join()
