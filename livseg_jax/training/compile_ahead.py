"""Compiling a jitted function ahead of its first call, on a background thread.

The train step's program depends only on the config, the mesh and the shapes of the state and
the batch, not on their values. `train_and_evaluate` therefore traces, lowers and compiles it
(or loads it from the persistent compilation cache) while the main thread initialises or restores
the state, starts the input pipeline and waits for the first batch; the first step then waits
only for what is left of the compile. XLA's compile runs in native code without Python's lock, so
the two really overlap; tracing is Python and shares the lock with the main thread.

A compile cannot be stopped midway, and a process that exits while XLA compiles aborts
("terminate called ...", exit status 134, seen with jax 0.10.2 on a CPU). The thread is therefore
not a daemon: Python waits for it before exiting, and `compile_ahead` says so when an error or an
interrupt unwinds through it while the compile still runs.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from livseg_jax.training import executable_cache
from livseg_jax.training.thread_context import collector_paused, scoped_like, thread_settings


class BackgroundCompile:
    """`jitted.trace(*args).lower().compile()` running on its own thread from construction.

    `args` may be arrays or `jax.ShapeDtypeStruct`s (with shardings): only shapes, dtypes and
    shardings matter. `jitted` may also be a `jax.stages.Traced` (then no `args`), lowered and
    compiled here. `result()` returns the `jax.stages.Compiled` (a `SplitCompiled` for the
    step as parts, `step_programs`), callable on arguments of exactly those types.
    With `cache_file` (`executable_cache.program_key` names it),
    the program is loaded from there when it exists, without tracing, and stored there after a compile.
    With `defer_store`, that store waits for `release_store()` (or `wait()`): serialising a program
    holds Python's lock for about a second (the paper step's two programs on an H200 host: 1.22 and
    0.96 s, `experiments/bench_cache_write.py`), and the first step must not wait for it.
    With `after`, tracing waits for that event (another job's `lowered`: tracing holds Python's lock).
    With `hold_compile`, the program is traced and lowered at once but XLA compiles it only after
    `release_compile()` (or `result()`): the CPU cores stay with compiles that matter sooner, and
    `wait()` on a compile never released skips it (`result()` then raises RuntimeError).
    `compiler_options` go to XLA for this compile only (`jax.stages.Lowered.compile`), e.g. the number
    of threads it may use.
    """

    def __init__(self, jitted: Callable, *args: Any, name: str = "program", cache_file: pathlib.Path | None = None,
                 within: Callable[[], contextlib.AbstractContextManager] | None = None, defer_store: bool = False,
                 after: threading.Event | None = None, hold_compile: bool = False,
                 compiler_options: dict[str, Any] | None = None):
        self.name = name
        self.seconds: float | None = None  # wall time of trace + lower + compile (or of loading), once done
        self.loaded = False  # whether the program came from `cache_file` (executable_cache)
        self._jitted, self._args, self._cache_file = jitted, args, cache_file
        self._within = within or contextlib.nullcontext  # JAX's scoped settings are per thread: entered here
        self._caller_settings = thread_settings()  # as the calling thread sees them (scopes included)
        self._compiled = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        # Set once this job's Python work is over (traced and lowered, loaded, or failed): tracing holds
        # Python's lock, so work started after it does not slow it down.
        self.lowered = threading.Event()
        self._store_released = threading.Event()
        if not defer_store:
            self._store_released.set()
        self._after = after
        self._compiler_options = compiler_options
        self._compile_released = threading.Event()
        self._skipped = False  # `wait()` came before `release_compile()`: nothing compiled
        if not hold_compile:
            self._compile_released.set()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=f"compile {name}", daemon=False)
        self._thread.start()

    def _load(self) -> Any:
        if self._cache_file is None or not self._cache_file.exists():
            return None
        self.lowered.set()  # a load traces nothing
        try:
            compiled = executable_cache.load(self._cache_file)
        except Exception as e:  # an entry from a crash or another build: compile and replace it
            print(f"note: {self._cache_file}: compiled-program cache entry unreadable ({type(e).__name__}: {e}); "
                  f"compiling the {self.name} instead", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):  # a read-only cache: the compile goes on regardless
                self._cache_file.unlink(missing_ok=True)
            return None
        self.loaded = True
        return compiled

    def _compile(self) -> Any:
        if self._after is not None:
            self._after.wait()
        with scoped_like(self._caller_settings), self._within():
            with collector_paused():
                traced = self._jitted
                if not isinstance(traced, jax.stages.Traced):
                    traced = traced.trace(*self._args)
                lowered = traced.lower()
            self.lowered.set()
            self._compile_released.wait()
            if self._skipped:
                raise RuntimeError(f"the {self.name}'s compile was skipped: the run ended before it was needed")
            return lowered.compile(self._compiler_options)  # added to the jit's own options

    def _run(self) -> None:
        try:
            self._compiled = self._load() or self._compile()
        except BaseException as e:  # handed to the thread that asks for the result
            self._error = e
        finally:
            self.seconds = time.perf_counter() - self._started
            self.lowered.set()
            self._ready.set()
        if self._compiled is not None and not self.loaded and self._cache_file is not None:
            self._store_released.wait()
            try:  # after the result is handed over: the first step does not wait for the write
                executable_cache.store(self._cache_file, self._compiled)
            except Exception as e:  # a full disk, say: the run goes on; the write was atomic
                print(f"note: {self._cache_file}: could not keep the compiled {self.name} "
                      f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)

    def running(self) -> bool:
        """Returns whether the thread is still at work (compiling, or storing the program)."""
        return self._thread.is_alive()

    def ready(self) -> bool:
        """Returns whether the program (or the error) is there; the thread may still be storing it."""
        return self._ready.is_set()

    def release_store(self) -> None:
        """Lets a deferred store of the compiled program begin (`defer_store`)."""
        self._store_released.set()

    def release_compile(self) -> None:
        """Lets a held compile begin once the program is lowered (`hold_compile`)."""
        self._compile_released.set()

    def compile_released(self) -> bool:
        return self._compile_released.is_set()

    def wait(self) -> None:
        """Waits for the thread to end, however the compile ends: a deferred store is released, a held
        compile skipped."""
        if not self._compile_released.is_set():
            self._skipped = True
            self._compile_released.set()
        self.release_store()
        self._thread.join()

    def result(self) -> Any:
        """Waits for the program (releasing a held compile); returns it or raises what tracing or
        compiling raised."""
        self.release_compile()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._compiled


@contextlib.contextmanager
def compile_ahead(jitted: Callable, *args: Any, **settings: Any) -> Iterator[BackgroundCompile]:
    """Starts `BackgroundCompile(jitted, *args, **settings)` for the block and waits for its thread at
    the end; if the block raises while the compile still runs, first says that it waits for it."""
    job = BackgroundCompile(jitted, *args, **settings)
    try:
        yield job
    except BaseException:
        if not job.compile_released():  # held, never released: `wait()` skips it, nothing to wait for
            pass
        elif not job.ready():
            print(f"waiting for the {job.name}'s compile to finish before stopping (XLA cannot stop a compile "
                  "midway)", file=sys.stderr, flush=True)
        elif job.running():
            print(f"waiting for the compiled {job.name}'s write to the compiled-program cache",
                  file=sys.stderr, flush=True)
        raise
    finally:
        job.wait()  # also the program's write to the compiled-program cache, which follows the result
