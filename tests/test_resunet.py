"""Residual 3D U-Net (Zhang, Liu & Wang 2018): its layout and residual units (output = branch +
shortcut; stride-2 units halve the grid). The checks every network passes: tests/test_networks.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import network_checks as checks
import numpy as np

from livseg_jax.models import build_model
from livseg_jax.models.layers import ConvBN, Layers, activation_fn
from livseg_jax.models.resunet import ResidualUnit
from tools import parity

NAME = "resunet"


def test_layout_pre_activation_units_strided_down_sampling():
    v = checks.variables(NAME)["params"]
    levels = len(checks.FEATURES)
    assert "preact" not in v["enc0"]  # the first unit: conv-BN-act-conv, as the paper's level 1
    assert all("preact" in v[f"enc{s}"] for s in range(1, levels - 1))
    assert all("preact" in v[f"dec{s}"] for s in range(levels - 1)) and "preact" in v["bottleneck"]
    model = build_model(checks.tiny(NAME))
    _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                                mutable=["intermediates"]))(checks.variables(NAME), checks.inputs())
    grids = {k: state["intermediates"][k]["__call__"][0].shape[1] for k in ("enc0", "enc1", "enc3", "bottleneck")}
    assert grids == {"enc0": 16, "enc1": 8, "enc3": 2, "bottleneck": 1}  # no pooling: strided units


def _unit_and_variables(stride, preact, x):
    unit = ResidualUnit(6, activation_fn("relu"), stride=stride, preact=preact, layers=Layers())
    shapes = jax.eval_shape(lambda: unit.init(jax.random.key(0), x, train=True))
    return unit, parity.random_flax_variables(shapes, seed=stride + 2 * preact)


def test_residual_unit_is_its_branch_plus_its_shortcut():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 8, 3)), jnp.float32)
    for stride, preact in ((1, False), (2, True), (1, True)):
        unit, v = _unit_and_variables(stride, preact, x)
        apply = jax.jit(lambda v, x, unit=unit: unit.apply(v, x, train=False))
        full = apply(v, x)
        assert full.shape == (2, 8 // stride, 8 // stride, 8 // stride, 6)
        # Zero the branch's last conv: the unit is its shortcut, a 1x1x1 strided Conv-BN of x.
        zeroed = jax.tree.map(np.zeros_like, v["params"]["conv2"])
        only_shortcut = apply({**v, "params": {**v["params"], "conv2": zeroed}}, x)
        shortcut = ConvBN(6, (1, 1, 1), strides=(stride,) * 3, layers=Layers())
        expected = shortcut.apply({"params": v["params"]["shortcut"], "batch_stats": v["batch_stats"]["shortcut"]},
                                  x, train=False)
        np.testing.assert_allclose(only_shortcut, expected, rtol=1e-6, atol=1e-6)
        # Zero the shortcut's BatchNorm scale and shift: the unit is its branch alone.
        bn = v["params"]["shortcut"]["bn"]
        no_shortcut = {**v["params"], "shortcut": {**v["params"]["shortcut"],
                                                   "bn": jax.tree.map(np.zeros_like, bn)}}
        branch = apply({**v, "params": no_shortcut}, x)
        np.testing.assert_allclose(full, branch + expected, rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(branch).max()) > 1e-2 and float(jnp.abs(expected).max()) > 1e-2
