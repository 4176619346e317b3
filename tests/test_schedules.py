"""Learning-rate and α_ds schedules at epoch boundaries, and the optimiser that applies them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from livseg_jax.config import base_config
from livseg_jax.training import schedules

SPE = 7  # steps per epoch: odd on purpose, so step and epoch counts cannot be confused

# (epoch, expected factor) for a decay of 0.8 every 30 epochs, epochs counted from 1.
BOUNDARIES = [(1, 1.0), (30, 1.0), (31, 0.8), (60, 0.8), (61, 0.64), (90, 0.64), (91, 0.512)]


def _steps_of_epoch(epoch: int) -> tuple[int, int]:
    return (epoch - 1) * SPE, epoch * SPE - 1


@pytest.mark.parametrize("epoch,factor", BOUNDARIES)
def test_learning_rate_hits_documented_value_on_first_and_last_step_of_epoch(epoch, factor):
    lr = schedules.learning_rate_schedule(base_config().optim, SPE)
    for step in _steps_of_epoch(epoch):
        np.testing.assert_allclose(float(lr(step)), 1e-4 * factor, rtol=1e-6)


@pytest.mark.parametrize("epoch,factor", BOUNDARIES)
def test_ds_alpha_hits_documented_value_on_first_and_last_step_of_epoch(epoch, factor):
    alpha = schedules.ds_alpha_schedule(base_config().loss, SPE)
    for step in _steps_of_epoch(epoch):
        value = alpha(step)
        assert value.dtype == jnp.float32
        # α_ds(epoch) = 0.4 · 0.8^floor((epoch - 1) / 30), SPEC §2.
        np.testing.assert_allclose(float(value), 0.4 * 0.8 ** ((epoch - 1) // 30), rtol=1e-6)
        np.testing.assert_allclose(float(value), 0.4 * factor, rtol=1e-6)


def test_ds_alpha_is_jit_able_with_a_traced_step():
    alpha = jax.jit(schedules.ds_alpha_schedule(base_config().loss, SPE))
    steps = [0, 30 * SPE - 1, 30 * SPE, 60 * SPE]
    got = [float(alpha(jnp.int32(s))) for s in steps]
    np.testing.assert_allclose(got, [0.4, 0.4, 0.32, 0.256], rtol=1e-6)


def test_epoch_of_step_counts_from_one():
    assert schedules.epoch_of_step(0, SPE) == 1
    assert schedules.epoch_of_step(SPE - 1, SPE) == 1
    assert schedules.epoch_of_step(SPE, SPE) == 2
    assert schedules.epoch_of_step(30 * SPE, SPE) == 31
    assert int(schedules.epoch_of_step(jnp.int32(2 * SPE + 3), SPE)) == 3


def test_schedules_follow_config_values():
    cfg = base_config()
    cfg.optim.learning_rate, cfg.optim.decay, cfg.optim.decay_every_epochs = 3e-3, 0.5, 2
    cfg.loss.ds_alpha, cfg.loss.ds_decay, cfg.loss.ds_decay_every_epochs = 1.0, 0.1, 3
    lr = schedules.learning_rate_schedule(cfg.optim, 4)
    alpha = schedules.ds_alpha_schedule(cfg.loss, 4)
    np.testing.assert_allclose([float(lr(s)) for s in (7, 8, 16)], [3e-3, 1.5e-3, 7.5e-4], rtol=1e-6)
    np.testing.assert_allclose([float(alpha(s)) for s in (11, 12, 24)], [1.0, 0.1, 0.01], rtol=1e-5)


def test_bad_steps_per_epoch_or_decay_is_rejected():
    cfg = base_config()
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps_per_epoch"):
            schedules.learning_rate_schedule(cfg.optim, bad)
    cfg.loss.ds_decay_every_epochs = 0
    with pytest.raises(ValueError, match="deep-supervision decay period"):
        schedules.ds_alpha_schedule(cfg.loss, SPE)


def test_optimizer_applies_and_reports_the_scheduled_learning_rate():
    cfg = base_config().optim
    cfg.decay_every_epochs = 2  # decays after 2 epochs of 1 step: visible in 5 updates
    opt = schedules.make_optimizer(cfg, steps_per_epoch=1)
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    grads = {"w": jnp.ones(3)}  # constant gradient: each Adam step moves by -lr (1 - ~eps)
    lr = schedules.learning_rate_schedule(cfg, 1)
    update = jax.jit(opt.update)
    for k in range(5):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        expected = 1e-4 * 0.8 ** (k // 2)
        np.testing.assert_allclose(float(schedules.current_learning_rate(state)), expected, rtol=1e-6)
        np.testing.assert_allclose(float(lr(k)), expected, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(updates["w"]), -expected, rtol=1e-4)


def test_current_learning_rate_is_found_inside_a_chain_and_missing_is_an_error():
    opt = optax.chain(optax.clip_by_global_norm(1.0), schedules.make_optimizer(base_config().optim, SPE))
    state = opt.init({"w": jnp.zeros(2)})
    np.testing.assert_allclose(float(schedules.current_learning_rate(state)), 1e-4, rtol=1e-6)
    with pytest.raises(ValueError, match="inject"):
        schedules.current_learning_rate(optax.adam(1e-3).init({"w": jnp.zeros(2)}))
