"""The train step as two or three programs compiled side by side, for the first steps of a cold run.

XLA compiles one program mostly on one thread: its HLO passes (priority fusion alone took 7.5 s of
the paper network's step on an H200 host) and its code emission are serial, and only the ~1,000
kernels' LLVM and PTX compiles use the other cores (`experiments/bench_compile.py`'s compile
trace, session 11). Parts of the step compiled as separate programs on separate threads run those
serial phases side by side:

- two programs: the gradients (forward and backward passes), then the optimiser's update (Adam on
  each of the paper network's ~350 arrays: ~8,000 of the step's ~24,000 traced operations);
- three programs: the forward pass, which returns its pullback's residuals (the activations the
  backward pass reads), the backward pass, and the update.

No part donates its inputs. With the state donated to the update, its launch must wait
until the gradient program, still running, has finished reading the state, so the host stops
running ahead of the GPU (49-55 ms per step instead of ~40.5 on one host, session 11). Without it
the state exists twice for a moment (the paper network's is ~135 MB with Adam's moments).

The parts cost every step something: the programs pass about 5,400 arrays between them and the host
against the one program's 2,800, and XLA cannot fuse across their boundaries (the three programs
write the forward's residuals out in full). On H200 hosts two programs ran 40.3-82 ms per step back
to back, varying between invocations, three 48 ms, and the one program 40.1-40.2 ms every time
(docs/benchmarks.md, sessions 12-13). So `train` runs only its first steps as parts: once the
first step is done, the one program compiles in the background and the loop switches to it
(training/loop.py); the compiled-program cache keeps the one program, and a later run loads it and
skips the parts. On H200s with two programs (sessions 14-16, `bench_first_step`): the cold first
step 22.5-30.2 s against the one program's 37.1-39.2 s, and after the switch 24.5 steps per second,
the one program's own rate. Three programs reached the first step later (31.6 s with every kernel's
autotuning result shipped: the initialisation waits for all three parts' tracing, and four compiles
at once share 16 cores), so two is the GPU default. All forms do the same arithmetic; XLA may fuse it
differently across a boundary, so results agree to float rounding (tests/test_step_programs.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from livseg_jax.config_checks import step_programs_problem
from livseg_jax.training.thread_context import collector_paused, scoped_like, thread_settings

PROGRAM_NAMES = {2: "two programs", 3: "three programs"}
GPU_BACKENDS = ("gpu", "cuda", "rocm")  # `jax.default_backend()` names of GPUs


def check_step_programs(value: Any, backend: str | None = None, processes: int = 1) -> int:
    """Returns `train.step_programs` as 1, 2 or 3: None (auto) is 2 on GPUs in a one-process run and
    1 otherwise (the module docstring and `switches_to_one_program` say why; CPUs were not measured
    clean, docs/benchmarks.md session 11); raises ValueError for anything else (`config_checks`' check)."""
    problem = step_programs_problem(value)
    if problem:
        raise ValueError(f"train.step_programs {problem}")
    if value is None:
        return 2 if backend in GPU_BACKENDS and processes == 1 else 1
    return int(value)


def switches_to_one_program(programs: int, processes: int) -> bool:
    """Whether a run whose first steps are `programs` parts switches to the one program once that has
    compiled in the background. Not with several processes: each would be ready at its own step, and
    processes running different programs at one step would not meet in the same collectives, so
    there the parts run the whole run."""
    return programs > 1 and processes == 1


def switch_compile_options(threads: int, backend: str) -> dict[str, int] | None:
    """The compiler options for the one program compiled in the background after a start as parts
    (`train.switch_compile_threads`): on a GPU, `threads` > 0 caps XLA's parallel code generation
    (`xla_gpu_force_compilation_parallelism`), leaving cores to the parts' dispatch; else None (XLA's
    own choice, and nothing that would change the program's key in JAX's compilation cache)."""
    if threads and backend in GPU_BACKENDS:
        return {"xla_gpu_force_compilation_parallelism": int(threads)}
    return None


def _run_two(programs, state, batch):
    gradients, update = programs
    grads, aux = gradients(state, batch)
    return update(state, grads, aux)


def _run_three(programs, state, batch):
    forward, backward, update = programs
    residuals, aux = forward(state, batch)
    return update(state, backward(residuals, aux["loss"]), aux)


RUNS = {2: _run_two, 3: _run_three}


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


class SplitStep:
    """`train_step(state, batch) -> (state, metrics)` as `programs` (2 or 3) jitted programs, used like
    the one-program jit, including `.trace(...).lower().compile()`, which compiles them at the same time."""

    def __init__(self, train_step: Callable, in_shardings: tuple, replicated_sharding, programs: int = 2):
        if programs not in RUNS:
            raise ValueError(f"a split step has 2 or 3 programs, not {programs}")
        self.replicated = replicated_sharding
        jit = functools.partial(jax.jit, out_shardings=replicated_sharding)
        update = jit(train_step.apply_gradients, in_shardings=replicated_sharding)
        if programs == 2:
            self.programs = (jit(train_step.compute_gradients, in_shardings=in_shardings), update)
            return
        # The backward pass takes the pullback's residuals as a list: the pullback's tree (which holds the
        # traced function) is kept here from the forward's trace, and the programs' own trees stay plain.
        self._pullback_tree = None

        def forward(state, batch):
            pullback, aux = train_step.forward_pass(state, batch)
            residuals, self._pullback_tree = jax.tree.flatten(pullback)
            return residuals, aux

        def backward(residuals, loss):
            (grads,) = self._pullback_tree.unflatten(residuals)(jnp.ones_like(loss))  # as jax.grad seeds it
            return grads

        self.programs = (jit(forward, in_shardings=in_shardings), jit(backward, in_shardings=replicated_sharding),
                         update)

    def __call__(self, state, batch):
        return RUNS[len(self.programs)](self.programs, state, batch)

    def arguments(self, index: int, state, outputs: list) -> tuple:
        """Program `index`'s argument types (index >= 1) from the state's and the earlier programs' outputs."""
        replicate = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated)  # noqa: E731
        typed = jax.tree.map(replicate, outputs)
        if len(self.programs) == 2:  # the update: (state, grads, aux)
            return (jax.tree.map(replicate, state), *typed[0])
        if index == 1:  # the backward pass: (residuals, loss)
            residuals, aux = typed[0]
            return residuals, aux["loss"]
        return jax.tree.map(replicate, state), typed[1], typed[0][1]  # the update: (state, grads, aux)

    def lower(self, state, batch) -> SplitLowered:
        return self.trace(state, batch).lower()

    def trace(self, state, batch) -> SplitTraced:
        """Traces the first program; the others' arguments follow from its outputs."""
        return SplitTraced(self, state, self.programs[0].trace(state, batch))


class SplitTraced:
    def __init__(self, step: SplitStep, state, first):
        self.step, self.state, self.first = step, state, first

    def lower(self) -> SplitLowered:
        return SplitLowered(self.step, self.state, self.first, self.first.lower())


class SplitLowered:
    """The lowered first program and the others still to trace. `compile` starts each program's XLA
    compile (native code, without Python's lock) on a thread of its own as soon as it is lowered, and
    traces and lowers the next meanwhile, so no compile waits for another program's."""

    def __init__(self, step: SplitStep, state, first_traced, first_lowered):
        self.step, self.state = step, state
        self._outputs = [first_traced.out_info]
        self._lowered = [first_lowered]

    def _lower(self, index: int):
        """Program `index` traced and lowered once, whichever of `as_text`, `cost_analysis`, `compile` asks."""
        while len(self._lowered) <= index:
            at = len(self._lowered)
            traced = self.step.programs[at].trace(*self.step.arguments(at, self.state, self._outputs))
            self._outputs.append(traced.out_info)
            self._lowered.append(traced.lower())
        return self._lowered[index]

    def _all_lowered(self) -> list:
        return [self._lower(i) for i in range(len(self.step.programs))]

    def as_text(self) -> str:
        return "\n".join(part.as_text() for part in self._all_lowered())

    def cost_analysis(self) -> dict:
        return _summed_costs(self._all_lowered())

    def compile(self, compiler_options: dict[str, Any] | None = None) -> SplitCompiled:
        """Compiles every part, each with `compiler_options` (as `jax.stages.Lowered.compile`)."""
        settings = thread_settings()  # the compiling threads get this thread's scoped JAX settings

        def compile_on_thread(lowered):
            with scoped_like(settings):
                return lowered.compile(compiler_options)

        count = len(self.step.programs)
        with concurrent.futures.ThreadPoolExecutor(count - 1, thread_name_prefix="compile step part") as pool:
            started = [pool.submit(compile_on_thread, self._lowered[0])]
            for index in range(1, count - 1):
                with collector_paused():
                    lowered = self._lower(index)
                started.append(pool.submit(compile_on_thread, lowered))
            with collector_paused():
                last = self._lower(count - 1)
            # The last compiles here before any wait: in one expression, `(gradients.result(), update.compile())`
            # started the update's compile only after the gradients' had ended (session 12).
            last_compiled = last.compile(compiler_options)
            return SplitCompiled((*(future.result() for future in started), last_compiled))


class SplitCompiled:
    """The compiled programs, called as the step is: `(state, batch) -> (state, metrics)`."""

    def __init__(self, parts: tuple):
        if len(parts) not in RUNS:
            raise ValueError(f"a split step has 2 or 3 programs, not {len(parts)}")
        self.parts = parts

    def __call__(self, state, batch):
        return RUNS[len(self.parts)](self.parts, state, batch)

    def as_text(self) -> str:
        return "\n".join(part.as_text() for part in self.parts)

    def cost_analysis(self) -> dict:
        return _summed_costs(self.parts)
