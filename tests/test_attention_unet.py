"""3D Attention U-Net (Oktay et al. 2018): its attention gates (coefficients in [0, 1]; a gate whose psi
outputs zeros blocks its skip). The checks every network passes: tests/test_networks.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import network_checks as checks
import numpy as np

from livseg_jax.models import build_model
from livseg_jax.models.attention_unet import AttentionGate
from livseg_jax.models.layers import Layers

NAME = "attention_unet"


def test_every_skip_is_gated_with_coefficients_in_unit_interval():
    model = build_model(checks.tiny(NAME))
    v = checks.variables(NAME)
    out, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
        v, checks.inputs())
    coefficients = {k: c["coefficients"][0] for k, c in state["intermediates"].items()}
    assert sorted(coefficients) == [f"gate{s}" for s in range(len(checks.FEATURES) - 1)]
    for s, c in coefficients.items():
        level = int(s[-1])
        assert c.shape == (checks.BATCH, *(n // 2 ** level for n in checks.PATCH), 1)
        assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0
        assert float(c.max() - c.min()) > 1e-3  # not a constant: the gate looks at its inputs


def _gate(skip, gating, psi_bias=None, seed=0):
    gate = AttentionGate(4, Layers())
    v = gate.init(jax.random.key(seed), skip, gating, train=False)
    v = jax.tree.map(lambda a: a, v)
    if psi_bias is not None:  # psi outputs psi_bias everywhere
        psi = v["params"]["psi"]
        v["params"]["psi"] = {"kernel": jnp.zeros_like(psi["kernel"]), "bias": jnp.full_like(psi["bias"], psi_bias)}
    return lambda x, g: gate.apply(v, x, g, train=False, mutable=["intermediates"])


def test_a_gate_whose_psi_outputs_zero_coefficients_blocks_its_skip():
    rng = np.random.default_rng(0)
    skip_a, skip_b = (jnp.asarray(rng.normal(size=(2, 8, 8, 8, 6)), jnp.float32) for _ in range(2))
    gating = jnp.asarray(rng.normal(size=(2, 4, 4, 4, 10)), jnp.float32)
    blocked = _gate(skip_a, gating, psi_bias=-1e4)
    (ya, sa), (yb, _) = blocked(skip_a, gating), blocked(skip_b, gating)
    assert float(jnp.abs(sa["intermediates"]["coefficients"][0]).max()) == 0.0
    np.testing.assert_array_equal(ya, yb)  # the output does not depend on the skip's content
    # The same gate with its trained psi passes the skip through (the output depends on it),
    # and psi = 0 (alpha = 1/2) gives the projection of half the skip (alpha = 1 on skip / 2).
    open_gate = _gate(skip_a, gating)
    assert float(jnp.abs(open_gate(skip_a, gating)[0] - open_gate(skip_b, gating)[0]).max()) > 1e-3
    half, _ = _gate(skip_a, gating, psi_bias=0.0)(skip_a, gating)
    projected = _gate(skip_a, gating, psi_bias=1e4)(0.5 * skip_a, gating)[0]
    np.testing.assert_allclose(half, projected, rtol=1e-5, atol=1e-6)
