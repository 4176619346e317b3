"""The train step as two programs compiled side by side: gradients, then the optimiser's update.

XLA compiles one program mostly on one thread: its HLO passes (priority fusion alone took 7.5 s of
the paper network's step on an H200 host) and its code emission are serial, and only the ~1,000
kernels' LLVM and PTX compiles use the other cores (`experiments/bench_compile.py`'s compile
trace, session 11). The optimiser's update of the paper network is ~8,000 of the step's ~24,000
operations (Adam on each of ~350 arrays) and ~330 of its kernels. Compiled as a program of its own
on its own thread, it leaves the critical path: `train`'s cold first step of the liver `:paper` run
took 33.4-34.5 s against the one program's 40.9 s, side by side on one H200 host, and the step ran
at 40.4 ms back to back against the one program's 40.2 ms on another (docs/benchmarks.md, session 12).

The update program does not donate the old state. With donation its launch must wait until the
gradient program, still running, has finished reading the state, so the host stops running ahead of
the GPU: on one host the step took 49-55 ms back to back instead of ~40.5 (on another 41.3). Without
it the state exists twice for a moment (the paper network's is ~135 MB with Adam's moments).

But the host pays for it at every step: the two programs take and return about 5,400 arrays (the
state twice, the gradients and BatchNorm statistics between them) against the one program's 2,800.
On H200 hosts, dispatching 20 steps without waiting took 28.8 ms per step for the one program and
29.5-51.2 ms for the two, against ~40 ms of GPU time, so the host can become the bound. Back to back
(20 steps, three runs each) the two programs took 40.3-40.5 ms in the best invocations and up to 82
ms in others (63.4/46.1/40.6, 77.5/58.1/45.0, 40.3/48.4/40.4, 51.6/56.0/60.4, 80.8/81.9/81.6 ms),
while the one program held 40.1-40.2 ms in every run (docs/benchmarks.md, session 13). Hours of
training outweigh seconds of compile, so `train.step_programs` left at None (auto) is 1 on every
backend since session 13. With 2, `train` runs its first steps as these two programs and compiles
the one program in the background, then switches to it (training/loop.py): the two programs' cold
first step, the one program's steady steps; a later run loads the one program from the compiled-
program cache. That combination is not yet measured on a GPU. Both forms do the same arithmetic; XLA
may fuse it differently across the boundary, so results agree to float rounding
(tests/test_step_programs.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

import jax

from livseg_jax.config_checks import step_programs_problem
from livseg_jax.training.thread_context import collector_paused, scoped_like, thread_settings


def check_step_programs(value: Any, backend: str | None = None) -> int:
    """Returns `train.step_programs` as 1 or 2, None (auto) resolved as 1 on every backend (the
    module docstring says why; `backend` is kept for a choice per backend); raises ValueError for
    anything else (`config_checks`' check)."""
    problem = step_programs_problem(value)
    if problem:
        raise ValueError(f"train.step_programs {problem}")
    del backend  # one program everywhere since session 13
    return 1 if value is None else int(value)


def _summed_costs(parts) -> dict:
    """The programs' XLA cost analyses added key by key (numbers only), as one program's would read."""
    total: dict = {}
    for part in parts:
        analysis = part.cost_analysis()
        if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
            analysis = analysis[0] if analysis else {}
        for key, value in (analysis or {}).items():
            if isinstance(value, (int, float)):
                total[key] = total.get(key, 0.0) + value
    return total


class TwoProgramStep:
    """`train_step(state, batch) -> (state, metrics)` as the programs `gradients(state, batch) ->
    (grads, aux)` and `update(state, grads, aux)`, each jitted; used like the one-program jit,
    including `.trace(...).lower().compile()`, which compiles the two at the same time."""

    def __init__(self, train_step: Callable, in_shardings: tuple, replicated_sharding):
        self.replicated = replicated_sharding
        self.gradients = jax.jit(train_step.compute_gradients, in_shardings=in_shardings,
                                 out_shardings=replicated_sharding)
        self.update = jax.jit(train_step.apply_gradients, in_shardings=replicated_sharding,
                              out_shardings=replicated_sharding)

    def __call__(self, state, batch):
        grads, aux = self.gradients(state, batch)
        return self.update(state, grads, aux)

    def lower(self, state, batch) -> TwoProgramLowered:
        return self.trace(state, batch).lower()

    def trace(self, state, batch) -> TwoProgramTraced:
        """Traces the gradient program; the update's arguments follow from its outputs."""
        gradients = self.gradients.trace(state, batch)
        replicate = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated)  # noqa: E731
        update_args = (jax.tree.map(replicate, state), *jax.tree.map(replicate, gradients.out_info))
        return TwoProgramTraced(gradients, self.update, update_args)


class TwoProgramTraced:
    def __init__(self, gradients, update: Callable, update_args: tuple):
        self.gradients, self.update, self.update_args = gradients, update, update_args

    def lower(self) -> TwoProgramLowered:
        return TwoProgramLowered(self.gradients.lower(), self.update, self.update_args)


class TwoProgramLowered:
    """The lowered gradient program and the update still to trace: `compile` traces and lowers the
    update (Python) while XLA compiles the gradient program (native code, without Python's lock),
    so neither the update's tracing nor its compile waits for the other program."""

    def __init__(self, gradients, update: Callable, update_args: tuple):
        self.gradients, self.update, self.update_args = gradients, update, update_args

    @functools.cached_property
    def _update_lowered(self):
        """The update traced and lowered once, whichever of `as_text`, `cost_analysis`, `compile` asks."""
        return self.update.trace(*self.update_args).lower()

    def as_text(self) -> str:
        return "\n".join((self.gradients.as_text(), self._update_lowered.as_text()))

    def cost_analysis(self) -> dict:
        return _summed_costs((self.gradients, self._update_lowered))

    def compile(self) -> TwoProgramCompiled:
        settings = thread_settings()  # the compiling thread gets this thread's scoped JAX settings

        def compile_gradients():
            with scoped_like(settings):
                return self.gradients.compile()

        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile gradients") as pool:
            gradients = pool.submit(compile_gradients)
            with collector_paused():
                update = self._update_lowered
            # The update compiles before waiting for the gradients: in one expression, `(gradients.result(),
            # update.compile())` started the update's compile only after the other's had ended (session 12).
            update_compiled = update.compile()
            return TwoProgramCompiled((gradients.result(), update_compiled))


class TwoProgramCompiled:
    """The compiled programs, called as the step is: `(state, batch) -> (state, metrics)`."""

    def __init__(self, parts: tuple):
        self.parts = parts

    def __call__(self, state, batch):
        gradients, update = self.parts
        grads, aux = gradients(state, batch)
        return update(state, grads, aux)

    def as_text(self) -> str:
        return "\n".join(part.as_text() for part in self.parts)

    def cost_analysis(self) -> dict:
        return _summed_costs(self.parts)

