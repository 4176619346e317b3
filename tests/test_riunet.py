"""RIU-Net (models/riunet.py): its residual Inception blocks. The checks every network passes:
tests/test_networks.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import network_checks as checks
import numpy as np
import pytest

from livseg_jax.models.layers import ConvBN, activation_fn
from livseg_jax.models.riunet import ACTIVATION, BRANCHES, ResInceptionBlock
from tools import parity


@pytest.mark.parametrize("c_in,features", [(3, 8), (8, 8)])
def test_residual_inception_block_concatenates_branches_and_adds_the_shortcut(c_in, features):
    """Each branch equals its own Conv-BN-ReLU chain; their concatenation feeds `fuse`; the output is
    ReLU(fuse + shortcut), the shortcut being the input itself when the widths agree."""
    act = activation_fn(ACTIVATION)
    block = ResInceptionBlock(features, act)
    x = checks.inputs(1, (8, 8, 8), c_in)
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False))
    variables = parity.random_flax_variables(shapes, seed=2)
    out, state = block.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]

    def sub(*path):
        return {c: functools.reduce(lambda t, k: t[k], path, variables[c]) for c in variables}

    width = features // 2
    branches = []
    for name, kernels in BRANCHES.items():
        y = x
        for i, kernel in enumerate(kernels):
            y = ConvBN(width, kernel, act=act).apply(sub(name, f"conv{i}"), y, train=False)
        np.testing.assert_allclose(inter[name]["__call__"][0], y, rtol=1e-5, atol=1e-5)
        assert float(jnp.std(y)) > 1e-3
        branches.append(y)
    np.testing.assert_allclose(inter["concat"][0], jnp.concatenate(branches, -1), rtol=1e-5, atol=1e-5)
    fused = ConvBN(features, (1, 1, 1)).apply(sub("fuse"), jnp.concatenate(branches, -1), train=False)
    if c_in == features:
        assert "shortcut" not in variables["params"]
        shortcut = x
    else:
        shortcut = ConvBN(features, (1, 1, 1)).apply(sub("shortcut"), x, train=False)
    np.testing.assert_allclose(out, act(fused + shortcut), rtol=1e-5, atol=1e-5)
    # Receptive fields 1, 3 and 5 voxels: a change two voxels away reaches only branch5's centre.
    x2 = x.copy()
    x2[:, 4, 4, 6] += 10.0
    _, state2 = block.apply(variables, x2, train=False, capture_intermediates=True, mutable=["intermediates"])
    moved = {name: float(jnp.abs(state2["intermediates"][name]["__call__"][0][:, 4, 4, 4]
                                 - inter[name]["__call__"][0][:, 4, 4, 4]).max()) for name in BRANCHES}
    assert moved["branch1"] == 0 and moved["branch3"] == 0 and moved["branch5"] > 0
