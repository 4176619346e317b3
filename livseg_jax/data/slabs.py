"""Work on a (D, H, W) volume split into slabs of slices, on one shared thread pool.

Reading (`nifti.internal_float32`, the slices of a DICOM series) and preprocessing
(`preprocess.body_bbox`, the fixed-factor grid) are memory-bound numpy passes (casts, copies,
comparisons, block sums, inflating) whose result for a voxel depends only on its own slice or a few
neighbouring ones. numpy and zlib release the GIL in those loops, so splitting the slices over
threads scales with the cores, and the result is bit-for-bit what one pass over the whole volume
gives (tests/test_fast_predict.py).

Every call shares one process-wide pool of `slab_threads()` workers, made at first use: callers on
several threads at once (the folder pipeline's readers and device workers) queue their slabs on it
instead of each starting a pool of its own, so the process never runs more slab threads than it has
cores. A call made from inside a slab (a nested call) runs inline: it cannot wait on the pool it
runs in.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable

import numpy as np

MAX_THREADS = 16  # beyond this, memory bandwidth, not cores, limits these passes

_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_threads = 0
_pool_pid = 0  # a forked child inherits the pool object but not its threads: it makes its own
_in_slab = threading.local()


def usable_cpus() -> int:
    """Returns the CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+: affinity-aware
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def slab_threads() -> int:
    """Returns how many threads `parallel_slabs` uses: the usable CPUs, at most 16 ($LIVSEG_THREADS overrides)."""
    if os.environ.get("LIVSEG_THREADS"):
        value = os.environ["LIVSEG_THREADS"]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"LIVSEG_THREADS must be a whole number >= 1, got {value!r}")
        return int(value)
    return max(1, min(MAX_THREADS, usable_cpus()))


def _mark_slab_thread() -> None:
    _in_slab.active = True


def shared_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Returns the process's slab pool of `slab_threads()` workers (made anew only when that number
    changes, or in a forked child)."""
    global _pool, _pool_threads, _pool_pid
    threads = slab_threads()
    with _lock:
        if _pool is None or _pool_threads != threads or _pool_pid != os.getpid():
            # An old pool is not shut down: a caller may still be queueing on it; its idle
            # threads exit once it is garbage collected.
            _pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="livseg-slab",
                                                          initializer=_mark_slab_thread)
            _pool_threads, _pool_pid = threads, os.getpid()
        return _pool


def parallel_slabs(fn: Callable[[int, int], None], count: int, threads: int | None = None, min_count: int = 8) -> None:
    """Calls fn(start, stop) over [0, count) split into contiguous slabs, on the shared pool.

    `threads` sets how many slabs (two per thread) and defaults to `slab_threads()`; at most
    `slab_threads()` of them run at once, whatever the number of callers. Each element is computed
    exactly as by one call over the whole range. The first exception of a slab is raised after
    every slab has finished.
    """
    threads = slab_threads() if threads is None else threads
    slabs = min(count, threads * 2)
    if threads <= 1 or count < min_count or slabs <= 1 or getattr(_in_slab, "active", False):
        fn(0, count)
        return
    bounds = np.linspace(0, count, slabs + 1).round().astype(int)
    pool = shared_pool()
    futures = [pool.submit(fn, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    concurrent.futures.wait(futures)  # no slab still writing when this returns or raises
    for future in futures:
        future.result()
