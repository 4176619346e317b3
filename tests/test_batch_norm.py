"""The two-stage BatchNorm form equals Flax's BatchNorm: values, gradients, running statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax.config import model_config
from livseg_jax.models import build_model, init_variables, variable_shapes
from livseg_jax.models.batch_norm import TwoStageBatchNorm, batch_norm_train, batch_norm_train_reference
from livseg_jax.models.forms import REFERENCE_FORMS

SHAPES = [(2, 5, 6, 7, 3), (3, 9, 10, 4), (40, 6)]  # volumetric, axial (2D) and a plain (N, C)


def both_forms(dtype):
    common = dict(momentum=0.9, epsilon=1e-5, dtype=dtype)
    return nn.BatchNorm(use_running_average=False, **common), TwoStageBatchNorm(**common)


def train_apply(module, variables, x, weights):
    """Returns (loss, (y, new batch_stats)) and its gradient with respect to (params, x)."""
    def loss(params, x):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  mutable=["batch_stats"])
        return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * weights), (y, updates["batch_stats"])

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_two_stage_equals_flax_in_values_gradients_and_running_statistics(shape, dtype):
    rng = np.random.default_rng(0)
    values = rng.normal(1.5, 3.0, size=shape)  # off-centre, so the mean matters
    values[..., 0] = 2.5  # a constant channel: variance 0, where epsilon alone keeps it finite
    values[..., 1] = 0.75 + 3e-3 * rng.normal(size=shape[:-1])  # variance about epsilon (1e-5)
    x = jnp.asarray(values, dtype)
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
    flax_bn, two_stage = both_forms(dtype)
    variables = flax_bn.init(jax.random.key(0), x)
    # The same variables, initialised the same way: checkpoints do not depend on the form.
    fresh = two_stage.init(jax.random.key(0), x)
    assert jax.tree.structure(fresh) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    c = shape[-1]
    variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=c), jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
                                 "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}}
    (loss_w, (y_w, stats_w)), grads_w = train_apply(flax_bn, variables, x, weights)
    (loss_g, (y_g, stats_g)), grads_g = train_apply(two_stage, variables, x, weights)
    assert y_g.dtype == y_w.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.float32(y_g), np.float32(y_w), rtol=tol, atol=tol)
    np.testing.assert_allclose(loss_g, loss_w, rtol=1e-5 if dtype == jnp.float32 else 1e-3)
    for key in ("mean", "var"):
        np.testing.assert_allclose(stats_g[key], stats_w[key], rtol=1e-5, atol=1e-6)
    for g, w in zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads_w), strict=True):
        assert g.dtype == w.dtype
        # float32: sums in another order. bfloat16: the input gradient is rounded to bf16 at the
        # end, so the forms may differ by a unit in the last place (2^-8 of the value) or two.
        scale = float(np.max(np.abs(np.float32(w))))
        np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=0, atol=(1e-5 if dtype == jnp.float32 else 1e-2)
                                   * scale)


def test_written_out_backward_equals_autodiff_for_every_output():
    # The statistics are outputs too; in training only the running averages read them (no
    # gradient), but a caller differentiating through them gets the exact gradient as well.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 4, 5, 6, 3)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 3), jnp.float32)
    bias = jnp.asarray(rng.normal(size=3), jnp.float32)
    w_y, w_m, w_v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (3,), (3,)))

    def loss(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias, 1e-5)
            return jnp.sum(y * w_y) + jnp.sum(mean * w_m) + jnp.sum(var * w_v)
        return f

    got = jax.grad(loss(batch_norm_train), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(batch_norm_train_reference), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_two_stage_under_vmap_is_per_group_batch_norm():
    # Statistics per group under vmap, as Flax's (the per-device step vmapped the model over groups
    # until session 10; it now runs under shard_map, tests/test_batch_norm_stats.py).
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 5, 6, 2)), jnp.float32)
    flax_bn, two_stage = both_forms(jnp.float32)
    variables = flax_bn.init(jax.random.key(0), x[0])

    def grouped(module):
        def f(params, x):
            y, _ = jax.vmap(lambda xg: module.apply({"params": params, "batch_stats": variables["batch_stats"]}, xg,
                                                    mutable=["batch_stats"]))(x)
            return jnp.sum(jnp.sin(y))
        return jax.grad(f, argnums=(0, 1))(variables["params"], x)

    for g, w in zip(jax.tree.leaves(grouped(two_stage)), jax.tree.leaves(grouped(flax_bn)), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


# Three levels hold every block kind (ELANRes blocks, MSCA in an encoder stage and the bottleneck,
# down- and upsampling, the heads) and compile in about half the time of five (session 15).
NETWORK_FEATURES = (2, 4, 8)
# 32^3: the bottleneck's statistics come from 1,024 values per channel. With five levels at 16^3
# (2 values) the fast variance E[x^2] - E[x]^2 cancelled catastrophically and either form's
# rounding moved the result.
NETWORK_PATCH = (32, 32, 32)
# The initialisation compiled without LLVM optimisation, as training does (training/state.py): 9
# instead of 24 s here, for a program that runs once.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def network(**forms):
    cfg = model_config("elanres_msca_unet")
    cfg.features = NETWORK_FEATURES
    cfg.update(REFERENCE_FORMS)
    cfg.update(forms)
    return build_model(cfg)


@pytest.fixture(scope="module")
def network_variables():
    """Variables of the test network; every form has the same tree (checked below)."""
    return jax.jit(lambda key: init_variables(network(), key, NETWORK_PATCH), compiler_options=QUICK_COMPILE)(
        jax.random.key(0))


# Every block kind (RepConv, ELAN, MSCA, heads), with the reference convolutions and with the GPU
# forms of the convolutions (which "auto" combines with the two-stage BatchNorm on a GPU).
@pytest.mark.parametrize("conv_forms", [{}, {"depthwise_impl": "shift", "pointwise_impl": "einsum",
                                             "dense_pack_channels": 32}], ids=["reference", "gpu_convs"])
def test_the_network_trains_the_same_with_either_form(conv_forms, network_variables):
    reference, fast = network(**conv_forms), network(**conv_forms, batch_norm_impl="two_stage")
    assert fast.layers.batch_norm_impl == "two_stage"
    variables, patch = network_variables, NETWORK_PATCH
    assert jax.tree.structure(variable_shapes(fast, patch)) == jax.tree.structure(variables)
    x = jax.random.normal(jax.random.key(1), (2, *patch, 1), jnp.float32)

    def step(model):
        def loss(params):
            outs, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                        mutable=["batch_stats"])
            return sum(jnp.sum(jnp.sin(o)) for o in outs), updates["batch_stats"]
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (loss_g, stats_g), grads_g = step(fast)
    (loss_w, stats_w), grads_w = step(reference)
    np.testing.assert_allclose(loss_g, loss_w, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(stats_g), jax.tree.leaves(stats_w), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    # Some gradients are exactly zero in exact arithmetic and rounding noise in either form: a bias
    # right before a BatchNorm, a one-input-channel 1x1 conv before one (BatchNorm undoes its scale).
    # So the absolute tolerance is relative to the largest gradient; a wrong one would be off by O(1).
    largest = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(grads_w))
    for g, w in zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads_w), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5 * largest)
