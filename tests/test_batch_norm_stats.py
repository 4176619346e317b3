"""`train.batch_norm_stats`: global (synchronised) against per-device BatchNorm statistics.

One train step of a tiny U-Net on 4 of the 8 virtual CPU devices (conftest), batch 8 (2 patches per
device, as on the GPUs). The optimiser records the gradients it is given in its state, so the
step's gradients are compared directly, not through an update.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from livseg_jax import losses
from livseg_jax.config import base_config
from livseg_jax.config_checks import ConfigError, validate_config
from livseg_jax.models import build_model
from livseg_jax.training.state import create_train_state
from livseg_jax.training.step import (
    batch_sharding,
    jit_train_step,
    make_mesh,
    make_train_step,
    replicated,
)

DEVICES = 4
PER_DEVICE = 2
PATCH = (16, 16, 16)
TOL = 1e-5  # max |difference| / max |reference| of float32 sums taken in another order


def recorded_gradients() -> optax.GradientTransformation:
    """Returns an identity transformation whose state is the latest gradients it was given."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


# The paper network (tiny widths) with every GPU computation form: the depthwise shift form and
# the two-stage BatchNorm have their own gradients (jax.custom_vjp), which must hold under the
# per-device step's shard_map. Three levels keep 2x4x4 values per patch at the bottleneck.
GPU_FORMS_NETWORK = {"name": "elanres_msca_unet", "features": (2, 4, 4), "depthwise_impl": "shift",
                     "pointwise_impl": "einsum", "dense_pack_channels": 32, "batch_norm_impl": "two_stage"}


@functools.cache
def setup(batch_norm_impl: str = "flax", network: str = "unet"):
    """Returns (model, loss config, optimiser, batch): each device's patches on their own scale."""
    config = base_config()
    config.model.name, config.model.features = "unet", (4, 8)
    config.model.batch_norm_impl = batch_norm_impl
    patch = PATCH
    if network == "gpu_forms":
        config.model.update(GPU_FORMS_NETWORK)
        patch = (8, 16, 16)
    elif network == "dropout":
        config.model.dropout = 0.5
    model = build_model(config.model)
    optimizer = optax.chain(recorded_gradients(), optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    rng = np.random.default_rng(0)
    batch = DEVICES * PER_DEVICE
    # Shard g: intensities scaled by 1 + g and shifted by g, so per-shard statistics differ clearly.
    group = np.repeat(np.arange(DEVICES), PER_DEVICE)[:, None, None, None, None]
    image = rng.normal(size=(batch, *patch, 1)) * (1 + group) + group
    label = rng.random((batch, *patch)) < 0.3
    return model, config.loss, optimizer, {"image": np.float32(image), "label": label.astype(np.int32)}


@functools.cache
def initial_state(batch_norm_impl: str = "flax", network: str = "unet"):
    """The step's initial state on the host, compiled once per network (the paper network's
    initialisation compiles for 6-8 s on the 2-core machine)."""
    model, _, optimizer, _ = setup(batch_norm_impl, network)
    return jax.device_get(jax.jit(lambda: create_train_state(model, optimizer, 0))())


@functools.cache
def run(batch_norm_stats: str, devices: int, batch_norm_impl: str = "flax", network: str = "unet"):
    """Returns (metrics, new state, gradients, compiled HLO text) of one step on `devices` devices."""
    model, loss_config, optimizer, batch = setup(batch_norm_impl, network)
    mesh = make_mesh(jax.devices()[:devices])
    state = jax.device_put(initial_state(batch_norm_impl, network), replicated(mesh))
    step = jit_train_step(make_train_step(model, optimizer, loss_config, 10, None, batch_norm_stats, mesh), mesh,
                          donate_state=False)
    sharded = jax.device_put(batch, batch_sharding(mesh))
    compiled = step.lower(state, sharded).compile()
    metrics, new_state = compiled(state, sharded)[::-1]
    return jax.device_get(metrics), jax.device_get(new_state), jax.device_get(new_state.opt_state[0]), \
        compiled.as_text()


def max_rel_diff(a, b) -> float:
    """Returns the largest max |a - b| / max |b| over the leaves of two trees."""
    rel = lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(y)) + 1e-12))  # noqa: E731
    return max(jax.tree.leaves(jax.tree.map(rel, a, b)))


def diff_relative_to_largest(a, b) -> float:
    """Returns the largest |a - b| over the leaves of two trees, over the largest |b| of all leaves.

    For gradients: some are zero in exact arithmetic (a bias feeding a BatchNorm) and rounding noise
    in either computation, so a per-leaf relative difference would compare noise with noise.
    """
    largest = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)) / largest


def per_device_and_reference(batch_norm_impl: str = "flax", network: str = "unet"):
    """Returns ((metrics, new state, gradients) of the per-device step on DEVICES devices,
    (loss, gradients, new batch_stats) of `reference_per_device` at the same ds_alpha)."""
    metrics, state, grads, _ = run("per_device", DEVICES, batch_norm_impl, network)
    return (metrics, state, grads), reference_per_device(float(metrics["ds_alpha"]), batch_norm_impl, network)


def reference_per_device(ds_alpha: float, batch_norm_impl: str = "flax", network: str = "unet"):
    """Returns (loss, gradients, new batch_stats): the model on each shard in turn, averaged."""
    model, loss_config, optimizer, batch = setup(batch_norm_impl, network)
    state = initial_state(batch_norm_impl, network)

    # Shard g's dropout key as the step makes it: the step's key split once per device.
    keys = jax.random.split(jax.random.fold_in(state.rng, state.step), DEVICES)

    @jax.jit
    def shard_loss(params, image, label, key):
        def loss(p):
            outs, updates = model.apply({"params": p, "batch_stats": state.batch_stats}, image, train=True,
                                        mutable=["batch_stats"], rngs={"dropout": key})
            return losses.deep_supervision_loss(outs, label, loss_config, ds_alpha)[0], updates["batch_stats"]
        return jax.value_and_grad(loss, has_aux=True)(params)

    results = [shard_loss(state.params, batch["image"][g * PER_DEVICE:(g + 1) * PER_DEVICE],
                          batch["label"][g * PER_DEVICE:(g + 1) * PER_DEVICE], keys[g]) for g in range(DEVICES)]
    mean = lambda *xs: np.mean(np.stack(xs), axis=0)  # noqa: E731
    loss = mean(*[r[0][0] for r in results])
    grads = jax.tree.map(mean, *[r[1] for r in results])
    stats = jax.tree.map(mean, *[r[0][1] for r in results])
    return loss, grads, stats


def test_per_device_on_one_device_is_the_global_step():
    (m_global, s_global, g_global, _), (m_per, s_per, g_per, _) = run("global", 1), run("per_device", 1)
    assert float(m_per["loss"]) == float(m_global["loss"])
    assert max_rel_diff(g_per, g_global) == 0.0
    assert max_rel_diff(s_per.batch_stats, s_global.batch_stats) == 0.0
    assert max_rel_diff(s_per.params, s_global.params) == 0.0


def test_per_device_equals_each_shard_on_its_own_averaged():
    (metrics, state, grads), (loss, ref_grads, ref_stats) = per_device_and_reference()
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=TOL)
    assert max_rel_diff(grads, ref_grads) <= TOL
    assert max_rel_diff(state.batch_stats, ref_stats) <= TOL
    # Not vacuous: the synchronised step differs from it in every respect compared.
    g_metrics, g_state, g_grads, _ = run("global", DEVICES)
    assert abs(float(g_metrics["loss"]) - float(loss)) > 100 * TOL * abs(float(loss))
    assert max_rel_diff(g_grads, ref_grads) > 100 * TOL
    assert max_rel_diff(g_state.batch_stats, ref_stats) > 100 * TOL


def test_global_statistics_on_several_devices_equal_one_device():
    (m_one, s_one, g_one, _), (m_n, s_n, g_n, _) = run("global", 1), run("global", DEVICES)
    assert float(m_n["loss"]) == pytest.approx(float(m_one["loss"]), rel=TOL)
    assert max_rel_diff(g_n, g_one) <= TOL
    assert max_rel_diff(s_n.batch_stats, s_one.batch_stats) <= TOL


def test_per_device_statistics_need_fewer_all_reduces():
    count = lambda hlo: hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")  # noqa: E731
    synchronised, per_device = count(run("global", DEVICES)[3]), count(run("per_device", DEVICES)[3])
    assert per_device >= 1  # the gradients are still summed over the devices
    assert per_device < synchronised, (per_device, synchronised)


def test_unknown_setting_names_the_key():
    model, loss_config, optimizer, _ = setup()
    with pytest.raises(ValueError, match="train.batch_norm_stats"):
        make_train_step(model, optimizer, loss_config, 10, None, "sync", make_mesh(jax.devices()[:1]))
    with pytest.raises(ValueError, match="train.batch_norm_stats"):
        make_train_step(model, optimizer, loss_config, 10, None, "per_device", None)
    config = base_config()
    config.train.batch_norm_stats = "per_gpu"
    with pytest.raises(ConfigError, match="train.batch_norm_stats"):
        validate_config(config)


@pytest.mark.parametrize("batch_norm_stats", ["global", "per_device"])
def test_two_stage_batch_norm_takes_the_same_step_on_several_devices(batch_norm_stats):
    # The GPU form of BatchNorm (models/batch_norm.py) under the sharded step: XLA inserts the
    # statistics' all-reduces into its sums ("global"), or each device runs it under shard_map.
    m_ref, s_ref, g_ref, _ = run(batch_norm_stats, DEVICES)
    m_new, s_new, g_new, _ = run(batch_norm_stats, DEVICES, "two_stage")
    assert float(m_new["loss"]) == pytest.approx(float(m_ref["loss"]), rel=TOL)
    assert max_rel_diff(s_new.batch_stats, s_ref.batch_stats) <= TOL
    assert diff_relative_to_largest(g_new, g_ref) <= 1e-4


def test_per_device_step_with_the_gpu_forms_equals_each_shard_on_its_own_averaged():
    (metrics, state, grads), (loss, ref_grads, ref_stats) = per_device_and_reference("two_stage", "gpu_forms")
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=TOL)
    assert max_rel_diff(state.batch_stats, ref_stats) <= 1e-4
    assert diff_relative_to_largest(grads, ref_grads) <= 1e-4


def test_per_device_step_draws_each_devices_dropout_from_its_own_key():
    (metrics, state, grads), (loss, ref_grads, ref_stats) = per_device_and_reference("flax", "dropout")
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=TOL)
    assert max_rel_diff(grads, ref_grads) <= TOL
    assert max_rel_diff(state.batch_stats, ref_stats) <= TOL
    # Not vacuous: dropout changed the step, and another key assignment would change it again.
    assert max_rel_diff(run("per_device", DEVICES)[2], ref_grads) > 100 * TOL
