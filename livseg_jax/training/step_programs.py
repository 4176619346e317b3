"""The train step as two programs compiled side by side: gradients, then the optimiser's update.

XLA compiles one program mostly on one thread: its HLO passes (priority fusion alone took 7.5 s of
the paper network's step on an H200 host) and its code emission are serial, and only the ~1,000
kernels' LLVM and PTX compiles use the other cores (`experiments/bench_compile.py`'s compile
trace, session 11). The optimiser's update of the paper network is ~8,000 of the step's ~24,000
operations (Adam on each of ~350 arrays) and ~330 of its kernels. Compiled as a program of its own
on its own thread, it leaves the critical path. On one H200 host the step's cold compile went from
29.1 to 22.5 s at 40.6 ms per step back to back against 40.3 ms (`experiments/bench_split_step.py`);
`train`'s cold first step from 47.2 to 40.9 s on another, side by side (docs/benchmarks.md, session 11).

The update program does not donate the old state. With donation its launch must wait until the
gradient program, still running, has finished reading the state, so the host stops running ahead of
the GPU: on one host the step took 49-55 ms back to back instead of ~40.5 (on another 41.3). Without
it the state exists twice for a moment (the paper network's is ~135 MB with Adam's moments).

`train.step_programs` is None by default: 2 on GPUs, 1 elsewhere. On a 2-core CPU the two
programs compiled the paper network's step 5-6.5 s faster (14.6 against 19.5-21.0 s) but ran each
step 13-15% slower (2.14-2.34 against 1.86-2.07 s at 16x64x64: the update allocates a new state
instead of reusing the old one's buffers), so CPUs keep the one program. 1 compiles the step as
one program everywhere, as before session 11; 2 as two. Both forms do the same arithmetic; XLA
may fuse it differently across the boundary, so results agree to float rounding
(tests/test_step_programs.py).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import jax

STEP_PROGRAMS = (1, 2)


def check_step_programs(value: Any, backend: str | None = None) -> int:
    """Returns `train.step_programs` as 1 or 2, None or "auto" resolved for `backend` (default:
    JAX's) as 2 on GPUs and 1 elsewhere; raises ValueError for anything else."""
    if value is None or value == "auto":
        return 2 if (backend or jax.default_backend()) == "gpu" else 1
    if isinstance(value, bool) or value not in STEP_PROGRAMS:
        raise ValueError(f"train.step_programs = {value!r}: use 1 (one program), 2 (gradients and update "
                         "compiled side by side) or None (the default: 2 on GPUs, 1 elsewhere)")
    return int(value)


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

    def _update_lowered(self):
        return self.update.trace(*self.update_args).lower()

    def as_text(self) -> str:
        return "\n".join((self.gradients.as_text(), self._update_lowered().as_text()))

    def cost_analysis(self) -> dict:
        return _summed_costs((self.gradients, self._update_lowered()))

    def compile(self) -> TwoProgramCompiled:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile gradients") as pool:
            gradients = pool.submit(self.gradients.compile)
            update = self._update_lowered().compile()
            return TwoProgramCompiled((gradients.result(), update))


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

