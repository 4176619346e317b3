"""Width-packed 3x3x3 convolutions (models/packed_conv.py) against plain convolutions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax.models.packed_conv import PackedConv3d, pack_kernel, packed_conv3d, packing_factor, tap_selection


def reference_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


@pytest.mark.parametrize(
    ("width", "c_in", "c_out", "target", "expected"),
    [
        (256, 8, 8, 32, 4),  # the full-resolution RepConv3d of the paper's network
        (128, 16, 16, 32, 2),
        (256, 1, 16, 32, 2),  # the larger side decides
        (64, 32, 32, 32, 1),  # already wide enough
        (6, 8, 8, 32, 2),  # 4 does not divide 6
        (7, 8, 8, 32, 1),
        (256, 8, 8, 0, 1),  # switched off
        (256, 8, 8, 64, 8),
    ],
)
def test_packing_factor(width, c_in, c_out, target, expected):
    assert packing_factor(width, c_in, c_out, target) == expected


def test_each_packed_tap_carries_exactly_the_original_tap_at_that_offset():
    select = tap_selection(4)
    # Every (input sub-position, output sub-position) pair at offset -1..1 is carried once.
    for s in range(4):
        for a in range(4):
            for t in range(3):
                offset = 4 * (t - 1) + s - a
                assert select[t, s, a].sum() == (1 if -1 <= offset <= 1 else 0)
                if -1 <= offset <= 1:
                    assert select[t, s, a, offset + 1] == 1
    # Each original tap appears once per output sub-position.
    np.testing.assert_array_equal(select.sum(axis=(0, 1)), np.ones((4, 3)))


@pytest.mark.parametrize(("shape", "c_out", "factor"), [
    ((2, 5, 6, 16, 8), 8, 4),
    ((1, 3, 4, 6, 3), 5, 2),
    ((1, 4, 3, 8, 1), 16, 8),  # one input channel, as the network's first convolution
    ((2, 3, 3, 4, 4), 4, 1),  # factor 1 is the plain convolution
])
def test_packed_convolution_and_its_gradients_match_the_plain_convolution(shape, c_out, factor):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, shape[-1], c_out)), jnp.float32)
    np.testing.assert_allclose(packed_conv3d(x, kernel, factor), reference_conv(x, kernel), rtol=1e-5, atol=1e-4)

    weights = jnp.asarray(rng.normal(size=(*shape[:-1], c_out)), jnp.float32)  # every voxel's gradient differs

    def loss(conv):
        return lambda x, k: jnp.sum(conv(x, k) * weights)

    got = jax.grad(loss(lambda x, k: packed_conv3d(x, k, factor)), argnums=(0, 1))(x, kernel)
    expected = jax.grad(loss(reference_conv), argnums=(0, 1))(x, kernel)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-3)


def test_border_voxels_see_zero_padding_not_their_packed_neighbours():
    # A single 1 in the last voxel of each width-row: only the W-1 and W-2 outputs may respond.
    x = jnp.zeros((1, 1, 1, 8, 1)).at[..., -1, 0].set(1.0)
    kernel = jnp.ones((3, 3, 3, 1, 1))
    y = packed_conv3d(x, kernel, 4)[0, 0, 0, :, 0]
    np.testing.assert_array_equal(y, [0, 0, 0, 0, 0, 0, 1, 1])


def test_packing_refuses_a_width_it_does_not_divide_and_non_3x3x3_kernels():
    with pytest.raises(ValueError, match="does not divide the width 6"):
        packed_conv3d(jnp.zeros((1, 2, 2, 6, 2)), jnp.zeros((3, 3, 3, 2, 2)), 4)
    with pytest.raises(ValueError, match="3x3x3"):
        pack_kernel(jnp.zeros((1, 1, 1, 2, 2)), 2)


def test_module_has_the_variables_and_values_of_nn_conv():
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8, 8))
    packed = PackedConv3d(8, 32, use_bias=True)
    plain = nn.Conv(8, (3, 3, 3), padding="SAME", use_bias=True)
    variables = plain.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, packed.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, variables)
    variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias too
    np.testing.assert_allclose(packed.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5)
    # bf16 compute keeps float32 parameters and stays close to the float32 result.
    packed16 = PackedConv3d(8, 32, dtype=jnp.bfloat16)
    y16 = packed16.apply(variables, x)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(y16.astype(jnp.float32), plain.apply(variables, x), rtol=0, atol=0.1)
