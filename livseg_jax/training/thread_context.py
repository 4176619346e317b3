"""What a thread that traces or compiles on another's behalf takes from it: JAX's scoped settings,
and the garbage collector paused while it traces.

`compile_ahead` traces and compiles the train step on a background thread, and the two-program
step as parts (`step_programs`) compiles each part on a thread of its own. JAX's scoped settings
(`with jax.default_matmul_precision(...)`, `with jax.numpy_rank_promotion(...)`) are per thread, so
each such thread enters the settings the requesting thread saw, as tracing there would have.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from typing import Any

import jax
from jax._src import config as jax_config  # scoping a setting by its name


def thread_settings() -> dict[str, Any]:
    """Returns JAX's settings as the calling thread sees them (its scopes included)."""
    return dict(jax.config.values)


def scoped_like(settings: dict[str, Any]) -> contextlib.ExitStack:
    """Enters, on this thread, every setting of `settings` (from `thread_settings` on another
    thread) that differs here; the returned stack leaves them."""
    stack = contextlib.ExitStack()
    holders = jax_config.config._value_holders  # no public way to scope a setting by name
    for name, value in settings.items():
        if jax.config.values.get(name) != value:
            stack.enter_context(holders[name](value))
    return stack


# Tracing makes many short-lived objects, and the collector's passes over them were a large share of
# the paper step's trace in a CPU profile (session 8; not measured on a GPU host). It is off, for the
# whole process, while any background thread traces and lowers, and back on for XLA's compile.
_collector_lock = threading.Lock()
_collector_holds = 0
_collector_was_on = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Turns Python's garbage collector off for the block (process-wide; nested holds counted)."""
    global _collector_holds, _collector_was_on
    with _collector_lock:
        if _collector_holds == 0:
            _collector_was_on = gc.isenabled()
            gc.disable()
        _collector_holds += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_holds -= 1
            if _collector_holds == 0 and _collector_was_on:
                gc.enable()
