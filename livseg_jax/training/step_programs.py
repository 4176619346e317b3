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

`train.step_programs = 1` compiles the step as one program, as before session 11. Both forms do
the same arithmetic; XLA may fuse it differently across the boundary, so results agree to float
rounding (tests/test_step_programs.py).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import jax

STEP_PROGRAMS = (1, 2)


def check_step_programs(value: Any) -> int:
    """Returns `train.step_programs` as an int; raises ValueError unless it is 1 or 2."""
    if isinstance(value, bool) or value not in STEP_PROGRAMS:
        raise ValueError(f"train.step_programs = {value!r}: use 1 (one program) or 2 (gradients and update "
                         "compiled side by side)")
    return int(value)


def _with_sharding(spec: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)


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

    def trace(self, state, batch) -> TwoProgramTraced:
        gradients = self.gradients.trace(state, batch)
        # The update's arguments: the state as given, the gradients' outputs (replicated).
        outputs = jax.tree.map(lambda s: _with_sharding(s, self.replicated), gradients.out_info)
        state_spec = jax.tree.map(lambda a: _with_sharding(jax.ShapeDtypeStruct(a.shape, a.dtype), self.replicated),
                                  state)
        return TwoProgramTraced((gradients, self.update.trace(state_spec, *outputs)))


class TwoProgramTraced:
    def __init__(self, parts: tuple):
        self.parts = parts

    def lower(self) -> TwoProgramLowered:
        return TwoProgramLowered(tuple(part.lower() for part in self.parts))


class TwoProgramLowered:
    def __init__(self, parts: tuple):
        self.parts = parts

    def as_text(self) -> str:
        return "\n".join(part.as_text() for part in self.parts)

    def compile(self) -> TwoProgramCompiled:
        """Compiles the programs on threads of their own (XLA's compile releases Python's lock)."""
        with concurrent.futures.ThreadPoolExecutor(len(self.parts), thread_name_prefix="compile part") as pool:
            futures = [pool.submit(part.compile) for part in self.parts]
            return TwoProgramCompiled(tuple(f.result() for f in futures))


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

