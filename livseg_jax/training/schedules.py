"""Step-indexed schedules of SPEC §2: the staircase learning rate, the deep-supervision weight α_ds,
and the Adam optimiser that carries the learning rate as a loggable hyper-parameter.

Steps count optimiser updates from 0; epochs count from 1, and an epoch is `steps_per_epoch`
updates, so steps `0 .. steps_per_epoch - 1` are epoch 1. With `E = decay_every_epochs`:

    lr(step)   = learning_rate · decay^floor((epoch - 1) / E)
    α_ds(step) = ds_alpha      · ds_decay^floor((epoch - 1) / ds_decay_every_epochs)

so epochs 1..30 use the initial value, 31..60 the value x0.8, and so on.

Reading the current learning rate: `make_optimizer` wraps Adam in `optax.inject_hyperparams`, so
its state (`optax.InjectStatefulHyperparamsState`) has `hyperparams["learning_rate"]`. After the
update with step count k it holds lr(k), the rate that update used (`current_learning_rate`
reads it, also through `optax.chain` / `MultiSteps` wrappers). Equivalently, evaluate
`learning_rate_schedule(optim_config, steps_per_epoch)(step)` yourself.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax


def _check_steps_per_epoch(steps_per_epoch: int) -> int:
    """Returns steps_per_epoch as an int, or raises if it is not a positive integer."""
    if int(steps_per_epoch) != steps_per_epoch or int(steps_per_epoch) < 1:
        raise ValueError(f"schedules: steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    return int(steps_per_epoch)


def _check_decay(value: float, every_epochs: int, what: str) -> None:
    """Raises a ValueError naming `what` when the decay factor or period is unusable."""
    if not value > 0:
        raise ValueError(f"schedules: {what} decay factor must be > 0, got {value!r}")
    if int(every_epochs) != every_epochs or int(every_epochs) < 1:
        raise ValueError(
            f"schedules: {what} decay period must be a positive integer number "
            f"of epochs, got {every_epochs!r}"
        )


def epoch_of_step(step: int | jax.Array, steps_per_epoch: int) -> int | jax.Array:
    """Returns the 1-based epoch that optimiser step `step` (0-based) belongs to."""
    spe = _check_steps_per_epoch(steps_per_epoch)
    return step // spe + 1


def learning_rate_schedule(optim_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Returns step -> learning rate: learning_rate · decay^floor((epoch - 1) / decay_every_epochs).

    Keys read: learning_rate, decay, decay_every_epochs (config.optim).
    """
    spe = _check_steps_per_epoch(steps_per_epoch)
    _check_decay(optim_config.decay, optim_config.decay_every_epochs, "learning-rate")
    return optax.exponential_decay(
        init_value=float(optim_config.learning_rate),
        transition_steps=int(optim_config.decay_every_epochs) * spe,
        decay_rate=float(optim_config.decay),
        staircase=True,
    )


def ds_alpha_schedule(
    loss_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> Callable[[int | jax.Array], jax.Array]:
    """Returns step -> α_ds (float32): ds_alpha · ds_decay^floor((epoch - 1) / ds_decay_every_epochs).

    Keys read: ds_alpha, ds_decay, ds_decay_every_epochs (config.loss). The callable is jit-able
    and accepts a Python int or a traced integer step.
    """
    spe = _check_steps_per_epoch(steps_per_epoch)
    _check_decay(loss_config.ds_decay, loss_config.ds_decay_every_epochs, "deep-supervision")
    alpha0 = float(loss_config.ds_alpha)
    decay = float(loss_config.ds_decay)
    period = int(loss_config.ds_decay_every_epochs) * spe

    def schedule(step: int | jax.Array) -> jax.Array:
        stage = jnp.floor_divide(jnp.asarray(step, jnp.int32), period).astype(jnp.float32)
        return (alpha0 * jnp.power(jnp.float32(decay), stage)).astype(jnp.float32)

    return schedule


def make_optimizer(
    optim_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """Returns Adam (b1, b2, eps from config.optim) driven by `learning_rate_schedule`.

    The learning rate is an injected hyper-parameter: read it with `current_learning_rate`.
    """
    schedule = learning_rate_schedule(optim_config, steps_per_epoch)
    return optax.inject_hyperparams(optax.adam)(
        learning_rate=schedule,
        b1=float(optim_config.b1),
        b2=float(optim_config.b2),
        eps=float(optim_config.eps),
    )


def current_learning_rate(opt_state: optax.OptState) -> jax.Array:
    """Returns the learning rate of the latest update, found anywhere in an optax state tree."""
    is_injected = lambda x: isinstance(x, optax.InjectHyperparamsState | optax.InjectStatefulHyperparamsState)
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=is_injected):
        if is_injected(leaf) and "learning_rate" in leaf.hyperparams:
            return leaf.hyperparams["learning_rate"]
    raise ValueError(
        "schedules: no injected 'learning_rate' in this optimiser state; build the optimiser "
        "with make_optimizer (optax.inject_hyperparams)"
    )
