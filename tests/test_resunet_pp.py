"""ResUNet++ (Jha et al. 2019) in 3D: its layout, SE, ASPP and decoder attention. The checks every
network passes: tests/test_networks.py."""

import jax
import jax.numpy as jnp
import network_checks as checks
import numpy as np
from jax import lax

from livseg_jax.models.layers import BN_EPSILON
from livseg_jax.models.resunet_pp import ASPP, ASPP_RATES, Attention, SqueezeExcite

NAME = "resunet_pp"


def test_layout_encoder_se_aspp_bridge_decoder_attention():
    params = checks.variables(NAME)["params"]
    assert {"enc0", "enc1", "enc3", "se0", "se3", "bridge", "att2", "att0", "up2", "dec0", "aspp_out"} <= set(params)
    assert "se4" not in params and "att3" not in params and "se" not in str(sorted(params["dec0"]))
    assert set(params["bridge"]) == {f"rate{r}" for r in ASPP_RATES} | {"fuse"}


def test_squeeze_excite_rescales_each_channel_by_its_pooled_statistics():
    se = SqueezeExcite()
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4, 16)) + jnp.arange(16.0) / 4
    v = se.init(jax.random.key(1), x)
    y = se.apply(v, x)
    scale = y / x
    # One scale per (sample, channel), constant over space, in (0, 1).
    np.testing.assert_allclose(scale, jnp.broadcast_to(scale[:, :1, :1, :1], scale.shape), rtol=1e-5)
    assert bool(jnp.all((scale > 0) & (scale < 1)))
    # It depends on the channels' means only: rearranging voxels (same means) keeps the scales.
    shuffled = jax.random.permutation(jax.random.key(2), x.reshape(2, 64, 16), axis=1, independent=False)
    y2 = se.apply(v, shuffled.reshape(x.shape))
    np.testing.assert_allclose(y2 / shuffled.reshape(x.shape), scale, rtol=1e-5)
    # ...and equals the hand computation sigmoid(W2 relu(W1 mean)).
    w1 = v["params"]["squeeze"]["kernel"].reshape(16, 2)
    w2 = v["params"]["excite"]["kernel"].reshape(2, 16)
    want = jax.nn.sigmoid(jax.nn.relu(x.mean(axis=(1, 2, 3)) @ w1) @ w2)
    np.testing.assert_allclose(scale[:, 0, 0, 0], want, rtol=1e-5)


def _dilated(x, kernel, rate):
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), [(rate, rate)] * 3, rhs_dilation=(rate,) * 3,
                                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                    precision=lax.Precision.HIGHEST)


def test_aspp_sums_parallel_branches_with_the_documented_dilation_rates():
    aspp = ASPP(3)
    x = jax.random.normal(jax.random.key(3), (1, 20, 20, 20, 2))
    v = aspp.init(jax.random.key(4), x, train=False)
    rng = np.random.default_rng(0)
    v = jax.tree.map(lambda a: a + jnp.asarray(rng.uniform(0.1, 0.5, a.shape), jnp.float32), v)
    got = aspp.apply(v, x, train=False)
    total = 0.0
    for r in (6, 12, 18, 1):  # the docstring's rates
        p, s = v["params"][f"rate{r}"], v["batch_stats"][f"rate{r}"]
        y = _dilated(x, p["conv"]["kernel"], r)
        bn = (y - s["bn"]["mean"]) / jnp.sqrt(s["bn"]["var"] + BN_EPSILON)
        total = total + bn * p["bn"]["scale"] + p["bn"]["bias"]
    fuse = v["params"]["fuse"]
    want = total @ fuse["kernel"].reshape(3, 3) + fuse["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # A wrong rate does not reproduce the branch: the check can fail.
    p = v["params"]["rate6"]["conv"]["kernel"]
    assert float(jnp.max(jnp.abs(_dilated(x, p, 6) - _dilated(x, p, 5)))) > 1e-2


def test_attention_gates_the_decoder_feature_guided_by_the_encoder():
    att = Attention()
    g = jax.random.normal(jax.random.key(5), (1, 8, 8, 8, 3))
    x = jax.random.normal(jax.random.key(6), (1, 4, 4, 4, 5))
    v = att.init(jax.random.key(7), g, x, train=False)
    out = att.apply(v, g, x, train=False)
    assert out.shape == x.shape
    # A zero gate blocks the feature; a different encoder feature changes the gating.
    zero = jax.tree.map(lambda a: a, v)
    zero["params"]["gate"]["conv"] = jax.tree.map(jnp.zeros_like, v["params"]["gate"]["conv"])
    assert float(jnp.abs(att.apply(zero, g, x, train=False)).max()) == 0.0
    assert float(jnp.abs(att.apply(v, g + 1.0, x, train=False) - out).max()) > 1e-3
