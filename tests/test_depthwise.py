"""The fused shifted-sum depthwise convolution, in its loop and stacked forms, equals the grouped
convolution (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax.models.depthwise import DepthwiseConv, depthwise_shift, depthwise_shift_reference


@pytest.mark.parametrize("impl", ["shift", "shift_stacked"])
@pytest.mark.parametrize("kernel,shape", [((5, 5), (3, 10, 12, 4)), ((1, 21), (2, 9, 16, 3)),
                                          ((21, 1), (2, 16, 9, 3)), ((3, 3, 3), (2, 6, 7, 8, 5))])
def test_shift_equals_grouped_convolution_and_its_gradient(kernel, shape, impl):
    x = jax.random.normal(jax.random.key(0), shape)
    conv, shift = DepthwiseConv(kernel, "conv"), DepthwiseConv(kernel, impl)
    variables = conv.init(jax.random.key(1), x)
    variables = {"params": {"kernel": variables["params"]["kernel"],
                            "bias": jax.random.normal(jax.random.key(2), (shape[-1],))}}
    np.testing.assert_allclose(shift.apply(variables, x), conv.apply(variables, x), rtol=1e-5, atol=1e-5)
    # Parameters are interchangeable: both forms create the same tree.
    assert jax.tree.structure(shift.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
    g_conv = jax.grad(loss(conv), argnums=(0, 1))(variables, x)
    g_shift = jax.grad(loss(shift), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(g_shift), jax.tree.leaves(g_conv), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel,shape", [((5, 5), (3, 10, 12, 4)), ((1, 21), (2, 9, 30, 3)),
                                          ((21, 1), (2, 30, 9, 3)), ((3, 1, 5), (2, 6, 7, 9, 4))])
def test_two_stage_backward_equals_autodiff_of_the_shifted_sum(kernel, shape, dtype, stacked):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    k = jnp.asarray(rng.normal(size=(*kernel, 1, shape[-1])), dtype)
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)  # a different gradient at every voxel

    def loss(conv):
        return lambda x, k: jnp.sum(conv(x, k).astype(jnp.float32) * weights)

    got = jax.grad(loss(lambda x, k: depthwise_shift(x, k, stacked)), argnums=(0, 1))(x, k)
    want = jax.grad(loss(depthwise_shift_reference), argnums=(0, 1))(x, k)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == dtype
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32), rtol=0, atol=tol * scale)


@pytest.mark.parametrize("stacked", [False, True])
def test_training_keeps_the_shifted_sums_between_optimisation_barriers(stacked):
    """The barriers that keep XLA from fusing the shifted sums into reductions are in the training
    program (the output; the cotangent in and the input gradient out), not in inference."""
    x, k = jnp.ones((1, 8, 8, 2)), jnp.ones((1, 5, 1, 2))
    backward = jax.jit(jax.grad(lambda x, k: jnp.sum(depthwise_shift(x, k, stacked) ** 2), argnums=(0, 1)))
    assert backward.lower(x, k).as_text().count("optimization_barrier") == 3
    forward = jax.jit(lambda x, k: depthwise_shift(x, k, stacked))
    assert "optimization_barrier" not in forward.lower(x, k).as_text()


def test_the_stacked_form_traces_a_few_operations_however_many_taps():
    """What `shift_stacked` is for: the loop form traces operations per tap, the stacked one per
    sum (one slice per tap aside), in the forward and in the input gradient."""
    x, k = jnp.ones((1, 9, 9, 9, 2)), jnp.ones((5, 5, 5, 1, 2))

    def size(stacked):
        grad = jax.grad(lambda x, k: jnp.sum(depthwise_shift(x, k, stacked)), argnums=(0, 1))
        return len(jax.jit(grad).trace(x, k).lower().as_text().splitlines())

    loop, stacked = size(False), size(True)
    assert stacked < 0.6 * loop, (stacked, loop)


@pytest.mark.parametrize("stacked", [False, True])
def test_shift_against_float64_loop_reference(stacked):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 6, 7, 2))
    k = rng.normal(size=(3, 5, 1, 2))
    padded = np.pad(x, ((0, 0), (1, 1), (2, 2), (0, 0)))
    ref = np.zeros_like(x)
    for i in range(6):
        for j in range(7):
            ref[0, i, j] = np.sum(padded[0, i:i + 3, j:j + 5] * k[:, :, 0], axis=(0, 1))
    got = depthwise_shift(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), stacked)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stacked", [False, True])
def test_bfloat16_input_accumulates_in_float32(stacked):
    x = jnp.full((1, 4, 64, 2), 1.0 + 2.0**-8, jnp.bfloat16)
    k = jnp.full((1, 21, 1, 2), 1.0, jnp.float32)
    y = depthwise_shift(x, k, stacked)
    assert y.dtype == jnp.bfloat16
    # Centre voxels sum 21 inputs; float32 accumulation keeps the sum at bf16 output precision.
    assert abs(float(y[0, 0, 32, 0]) - 21 * (1 + 2.0**-8)) < 0.1


def test_even_kernel_and_unknown_impl_are_errors():
    with pytest.raises(ValueError, match="odd kernel"):
        depthwise_shift(jnp.zeros((1, 4, 4, 1)), jnp.zeros((2, 2, 1, 1)))
    with pytest.raises(ValueError, match="impl must be one of"):
        DepthwiseConv((3, 3), "fft").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def test_shift_gradients_are_the_same_sharded_over_devices_and_under_vmap():
    """The barriers under the sharded train step (batch split over 4 of conftest's CPU devices)
    and under `vmap`: the same gradients. (The per-device step's shard_map is covered with the GPU
    forms in tests/test_batch_norm_stats.py.)"""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, 6, 10, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 7, 1, 3)), jnp.float32)
    loss = lambda x, k: jnp.sum(jnp.sin(depthwise_shift(x, k)))  # noqa: E731
    want = jax.grad(loss, argnums=(0, 1))(x, k)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    sharded = jax.jit(jax.grad(loss, argnums=(0, 1)),
                      in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P())))(x, k)
    per_group = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))(x.reshape(4, 2, 6, 10, 3), k)
    np.testing.assert_allclose(sharded[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded[1], want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_group[0].reshape(x.shape), want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_group[1].sum(0), want[1], rtol=1e-5, atol=1e-5)
