"""Train state: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

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

    The variables are initialised on the smallest patch the model takes: their shapes and values
    do not depend on the patch, and initialising on the training patch compiled the whole
    forward pass at that size (43 s of the first step's 150 s on an H200 for the liver `:paper`
    run, experiments/results/bench_compile_h200_s5.json).
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
