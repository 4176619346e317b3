"""UNet 3+ (models/unet3plus.py): its layout (full-scale deep supervision) and full-scale skips. The
checks every network passes: tests/test_networks.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from network_checks import CAT, FEATURES, LEVELS, PATCH, inputs, tiny, variables

from livseg_jax.models import build_model
from livseg_jax.models.layers import ConvBN, activation_fn
from livseg_jax.models.unet3plus import ACTIVATION, max_pool, upsample

NAME = "unet3plus"


def test_layout_a_head_on_the_bottleneck_and_on_every_decoder_level():
    params = variables(NAME)["params"]
    assert sorted(params) == sorted(
        [f"enc{s}" for s in range(LEVELS - 1)] + ["bottleneck"] + [f"dec{i}" for i in range(LEVELS - 1)]
        + [f"head{i}" for i in range(LEVELS)])  # bottleneck + four decoder levels, as the paper
    assert params["head0"]["kernel"].shape == (3, 3, 3, FEATURES[-1], 2)
    assert params["head4"]["kernel"].shape == (3, 3, 3, LEVELS * CAT, 2)


def test_every_decoder_level_receives_all_five_scales():
    """dec<i>'s fused input is L blocks of CAT channels; block j is scale<j> of source j resampled
    (max-pooled from finer encoder maps, trilinearly up-sampled from coarser decoder maps)."""
    model = build_model(tiny(NAME))
    v = variables(NAME)
    _, state = model.apply(v, inputs(1), train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    inter = state["intermediates"]
    maps = {j: inter[f"enc{j}"]["__call__"][0] for j in range(LEVELS - 1)}
    maps[LEVELS - 1] = inter["bottleneck"]["__call__"][0]
    act = activation_fn(ACTIVATION)
    for i in range(LEVELS - 1):
        fused = inter[f"dec{i}"]["fused_input"][0]
        size = PATCH[0] // 2 ** i
        assert fused.shape == (2, size, size, size, LEVELS * CAT)
        for j in range(LEVELS):
            src = maps[j] if j <= i else inter[f"dec{j}"]["__call__"][0] if j < LEVELS - 1 else maps[j]
            src = max_pool(src, 2 ** (i - j)) if j < i else upsample(src, 2 ** (j - i)) if j > i else src
            unit = {c: v[c][f"dec{i}"][f"scale{j}"] for c in v}
            want = ConvBN(CAT, (3, 3, 3), act=act).apply(unit, src, train=False)
            np.testing.assert_allclose(fused[..., j * CAT:(j + 1) * CAT], want, rtol=1e-5, atol=1e-5)
            assert float(jnp.std(want)) > 1e-3  # each block carries signal
    # And every scale matters: zeroing one source's unit changes the finest fused input.
    for j in range(LEVELS):
        params = jax.tree_util.tree_map(lambda a: a, v["params"])
        params["dec0"][f"scale{j}"]["bn"]["scale"] = np.zeros(CAT, np.float32)
        _, st = model.apply({**v, "params": params}, inputs(1), train=False,
                            capture_intermediates=True, mutable=["intermediates"])
        diff = np.abs(np.asarray(st["intermediates"]["dec0"]["fused_input"][0]) - np.asarray(
            inter["dec0"]["fused_input"][0])).reshape(-1, LEVELS, CAT).max(axis=(0, 2))
        assert diff[j] > 0 and np.all(np.delete(diff, j) == 0)
