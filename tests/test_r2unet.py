"""R2U-Net (Alom et al. 2018) in 3D: its recurrent residual units and their shared BatchNorm. The
checks every network passes: tests/test_networks.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import network_checks as checks
import numpy as np
import pytest

from livseg_jax.interop import mapping
from livseg_jax.models import build_model
from livseg_jax.models.layers import ConvBN, Layers
from livseg_jax.models.r2unet import RecurrentConv, RRCNNBlock
from tools import parity

NAME = "r2unet"


def test_layout_one_shared_conv_bn_per_recurrent_layer():
    # One shared ConvBN per recurrent layer: one conv and one BatchNorm, whatever t.
    enc0 = checks.variables(NAME)["params"]["enc0"]
    assert set(enc0) == {"proj", "rec0", "rec1"} and set(enc0["rec0"]) == {"unit"}
    assert set(enc0["rec0"]["unit"]) == {"conv", "bn"}


def _unit_apply(unit_vars, z, train):
    unit = ConvBN(4, (3, 3, 3), act=nn.relu, layers=Layers())
    if train:
        y, upd = unit.apply(unit_vars, z, train=True, mutable=["batch_stats"])
        return y, upd["batch_stats"]
    return unit.apply(unit_vars, z, train=False), unit_vars["batch_stats"]


@pytest.mark.parametrize("train", [False, True])
def test_recurrent_layer_with_t2_equals_the_hand_unrolled_recurrence(train):
    layer = RecurrentConv(4, nn.relu, steps=2)
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 6, 4))
    variables = layer.init(jax.random.key(3), x, train=True)
    variables = jax.tree.map(lambda a: a + 0.3 * jax.random.uniform(jax.random.key(4), a.shape), variables)
    got, upd = layer.apply(variables, x, train=train, mutable=["batch_stats"])
    unit_vars = {"params": variables["params"]["unit"], "batch_stats": variables["batch_stats"]["unit"]}
    # x1 = f(x); x2 = f(x + x1); x3 = f(x + x2), the same weights (and BatchNorm) each time.
    y, stats = _unit_apply(unit_vars, x, train)
    for _ in range(2):
        y, stats = _unit_apply({**unit_vars, "batch_stats": stats}, x + y, train)
    np.testing.assert_allclose(got, y, rtol=1e-6, atol=1e-6)
    # In training the running statistics are updated once per application (3 times), in turn.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), upd["batch_stats"]["unit"],
                 stats)
    once, _ = _unit_apply(unit_vars, x, train)
    assert checks.rel_error(got, once) > 1e-2  # t = 2 is not a single pass


def test_rrcnn_block_adds_its_projection_to_the_recurrent_stack():
    block = RRCNNBlock(4, nn.relu, steps=2)
    x = jax.random.normal(jax.random.key(5), (1, 4, 4, 4, 3))
    v = block.init(jax.random.key(6), x, train=False)
    got = block.apply(v, x, train=False)
    p = nn.Conv(4, (1, 1, 1)).apply({"params": v["params"]["proj"]}, x)
    rec = [RecurrentConv(4, nn.relu, steps=2) for _ in range(2)]
    y = p
    for i, r in enumerate(rec):
        y = r.apply({"params": v["params"][f"rec{i}"], "batch_stats": v["batch_stats"][f"rec{i}"]}, y, train=False)
    np.testing.assert_allclose(got, p + y, rtol=1e-6, atol=1e-6)
    assert jnp.all(jnp.isfinite(got))


def test_shared_batch_norm_updates_its_running_mean_per_application_as_torch_does():
    tm = checks.torch_models()
    cfg = checks.tiny(NAME)
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(cfg), seed=3).train()
    variables = mapping.state_dict_to_variables(parity.torch_state_numpy(torch_model), cfg)
    x = checks.inputs()
    _, stats = parity.flax_train_forward(build_model(cfg))(variables, x)
    parity.torch_forward(torch_model, x)  # one training-mode pass updates the running statistics
    for block in ("enc0", "dec0"):
        for rec in ("rec0", "rec1"):
            want = getattr(getattr(torch_model, block), rec).unit.bn.running_mean.numpy()
            np.testing.assert_allclose(stats[block][rec]["unit"]["bn"]["mean"], want, rtol=1e-4, atol=1e-5)
            before = variables["batch_stats"][block][rec]["unit"]["bn"]["mean"]
            assert float(np.max(np.abs(want - before))) > 1e-3  # the running mean moved
