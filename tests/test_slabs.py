"""The slab thread pool (`livseg_jax.data.slabs`): one bounded pool shared by every caller."""

import concurrent.futures
import os
import threading
import time

import pytest

from livseg_jax.data import slabs


@pytest.fixture(autouse=True)
def three_threads(monkeypatch):
    """Three slab threads even on a 2-core runner, so the pool is used."""
    monkeypatch.setenv("LIVSEG_THREADS", "3")


def test_concurrent_callers_share_one_pool_of_slab_threads_and_cover_every_index():
    seen = {caller: [] for caller in range(6)}
    running, most, workers = [0], [0], set()
    lock = threading.Lock()

    def work(caller):
        def fn(a, b):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
                workers.add(threading.get_ident())
            time.sleep(0.002)
            with lock:
                running[0] -= 1
                seen[caller].extend(range(a, b))
        for _ in range(5):
            slabs.parallel_slabs(fn, 40)

    with concurrent.futures.ThreadPoolExecutor(6) as callers:  # six callers at once, as the pipeline's threads
        list(callers.map(work, range(6)))
    assert all(sorted(v) == sorted(list(range(40)) * 5) for v in seen.values())
    assert most[0] <= 3  # never more slabs at once than slab threads, whatever the callers
    assert slabs.shared_pool() is slabs.shared_pool()
    assert len(workers) <= 3  # 30 calls, no pool per call: every slab ran on the shared pool's threads


def test_a_nested_call_runs_inline_and_a_slab_error_is_raised_after_all_slabs_finished():
    inner = []

    def outer(a, b):
        slabs.parallel_slabs(lambda c, d: inner.append((c, d)), 10)  # from a slab thread: inline, no deadlock

    slabs.parallel_slabs(outer, 12)
    assert inner.count((0, 10)) == len(inner) >= 2
    finished = []

    def failing(a, b):
        if a == 0:
            raise RuntimeError("bad slab")
        time.sleep(0.01)
        finished.append(a)

    with pytest.raises(RuntimeError, match="bad slab"):
        slabs.parallel_slabs(failing, 12)
    assert len(finished) == 5  # the other slabs of 6 completed before the error came back


def test_thread_count_follows_the_usable_cpus(monkeypatch):
    monkeypatch.delenv("LIVSEG_THREADS")
    if hasattr(os, "sched_getaffinity"):
        assert slabs.usable_cpus() == len(os.sched_getaffinity(0))
    assert slabs.slab_threads() == min(slabs.MAX_THREADS, slabs.usable_cpus())
    monkeypatch.setenv("LIVSEG_THREADS", "0")
    with pytest.raises(ValueError, match="LIVSEG_THREADS"):
        slabs.slab_threads()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")  # JAX's/3.12's fork notes
def test_a_forked_child_makes_its_own_pool_instead_of_waiting_on_the_parents_threads():
    slabs.parallel_slabs(lambda a, b: None, 12)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # child: the inherited pool has no threads; a hang here would fail the test by timeout
        seen = []
        slabs.parallel_slabs(lambda a, b: seen.extend(range(a, b)), 12)
        os._exit(0 if sorted(seen) == list(range(12)) else 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's parallel_slabs hung on the parent's pool")
