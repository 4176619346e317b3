"""Train state: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax._src import config as jax_config  # the threefry lowering as a scoped setting (JAX exposes it only globally)

from livseg_jax.models import UNet3D, init_variables


@flax.struct.dataclass
class TrainState:
    """Parameters, BatchNorm statistics, optimiser state, step counter and base RNG key."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # uint32 (2,) raw key; per-step keys are fold_in(rng, step)

    @property
    def variables(self) -> dict[str, Any]:
        """Returns `{"params", "batch_stats"}` for `model.apply`."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(model: UNet3D, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Returns a fresh TrainState (step 0) with parameters initialised from `seed`.

    The variables are initialised on the smallest patch the model takes (`init_variables`' default):
    their shapes and values do not depend on the patch (tests/test_models.py), so the state needs
    none. This does not make the initialisation compile faster: its forward pass is dead code that
    XLA removes either way, and what remains is the random initialisers' hashing (about 15,000
    operations for the `:paper` network; see `initial_train_state` for how train compiles it fast).
    """
    rng = jax.random.PRNGKey(seed)
    init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    variables = init_variables(model, init_rng, dropout_rng=dropout_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(variables["params"]),
        rng=state_rng,
    )


# The initialisation runs once, in milliseconds, but compiles for tens of seconds: its program is
# about 15,000 operations of threefry hashing and initialiser arithmetic (the forward pass is dead
# code). Two settings cut that compile, both applied by `initial_train_state`:
# - XLA backend level 0 (no LLVM optimisations): 2.3x faster on a 2-core CPU for the paper network
#   (30-32 s -> 13-14 s, experiments/bench_init_compile.py), no gain on an H200. The values agree
#   with the optimised program's within 2 units in the last place (about 1% of the state's elements
#   differ, by <= 1.2e-7: contracted multiply-adds).
# - On GPUs, the threefry hashing lowered to one CUDA kernel per call instead of unrolled HLO
#   (JAX's `jax_threefry_gpu_kernel_lowering`, the same bits): the paper network's initialisation
#   went from 50.2 s to 13.1 s on an H200, cold (experiments/bench_compile.py --init-only,
#   docs/benchmarks.md). Scoped to the initialisation: the train step keeps its measured lowering.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@contextlib.contextmanager
def init_lowering() -> Iterator[None]:
    """Traces, lowers and compiles the initialisation inside this context (no effect off GPUs)."""
    with jax_config.threefry_gpu_kernel_lowering(True):
        yield


def jit_create_train_state(model: UNet3D, optimizer: optax.GradientTransformation, seed: int,
                           out_shardings: Any = None) -> Any:
    """Returns `create_train_state` jitted with `INIT_COMPILER_OPTIONS`, placing the state on `out_shardings`.

    Call it, or trace / lower / compile it, inside `init_lowering()` (`initial_train_state` does).
    """
    return jax.jit(functools.partial(create_train_state, model, optimizer, seed), out_shardings=out_shardings,
                   compiler_options=INIT_COMPILER_OPTIONS)


def initial_train_state(model: UNet3D, optimizer: optax.GradientTransformation, seed: int,
                        out_shardings: Any = None) -> TrainState:
    """Returns `create_train_state(model, optimizer, seed)` computed by the fast-compiling program."""
    with init_lowering():
        return jit_create_train_state(model, optimizer, seed, out_shardings)()
