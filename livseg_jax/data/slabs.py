"""Work on a (D, H, W) volume split into slabs of slices, on a thread pool.

Reading (`nifti.internal_float32`) and preprocessing (`preprocess.body_bbox`, the fixed-factor
grid) are memory-bound numpy passes (casts, copies, comparisons, block sums) whose result for a
voxel depends only on its own slice or a few neighbouring ones. numpy releases the GIL in those
loops, so splitting the slices over threads scales with the cores, and the result is bit-for-bit
what one pass over the whole volume gives (tests/test_fast_predict.py).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable

import numpy as np


def slab_threads() -> int:
    """Returns how many threads `parallel_slabs` uses: the usable cores, at most 16 ($LIVSEG_THREADS overrides)."""
    if os.environ.get("LIVSEG_THREADS"):
        value = os.environ["LIVSEG_THREADS"]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"LIVSEG_THREADS must be a whole number >= 1, got {value!r}")
        return int(value)
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def parallel_slabs(fn: Callable[[int, int], None], count: int, threads: int | None = None, min_count: int = 8) -> None:
    """Calls fn(start, stop) over [0, count) split into contiguous slabs, on a thread pool.

    numpy releases the GIL in copies, casts and ufuncs, so memory-bound per-slab work scales with
    the cores; each element is computed exactly as by one call over the whole range.
    """
    threads = slab_threads() if threads is None else threads
    slabs = min(count, threads * 2)
    if threads <= 1 or count < min_count or slabs <= 1:
        fn(0, count)
        return
    bounds = np.linspace(0, count, slabs + 1).round().astype(int)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(fn, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]:
            future.result()
