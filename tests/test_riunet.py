"""RIU-Net (models/riunet.py): shapes, residual Inception blocks, deploy form, PyTorch twin, converter."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import network_checks as checks
import numpy as np
import pytest

from livseg_jax.config import model_config
from livseg_jax.interop import mapping
from livseg_jax.models import build_model, reparameterize, variable_shapes
from livseg_jax.models.layers import ConvBN, activation_fn
from livseg_jax.models.riunet import ACTIVATION, BRANCHES, ResInceptionBlock
from tools import parity

FEATURES = (4, 8, 8, 8, 8)
PATCH = (16, 16, 16)
HEADS = len(FEATURES) - 1
TOL = 1e-4


def tiny(**overrides):
    cfg = model_config("riunet")
    cfg.features = FEATURES
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _input(seed=0, patch=PATCH, channels=1):
    return np.random.default_rng(seed).normal(size=(2, *patch, channels)).astype(np.float32)


@functools.cache
def _variables(seed=0):
    return parity.random_flax_variables(mapping.flax_variable_shapes(tiny()), seed=seed)


def test_training_heads_coarse_to_fine_with_finite_gradients():
    model = build_model(tiny())
    variables = _variables()
    x = _input()

    def loss(params):
        heads, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return sum(jnp.mean(h ** 2) for h in heads), heads

    (value, heads), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    assert len(heads) == HEADS and all(h.shape == (2, *PATCH, 2) for h in heads)
    widths = [variables["params"][f"head{i}"]["kernel"].shape[-2] for i in range(HEADS)]
    assert widths == [FEATURES[3], FEATURES[2], FEATURES[1], FEATURES[0]]
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["enc0"]["branch5"]["conv2"]["conv"]["kernel"]).sum()) > 0
    assert model.apply(variables, x, train=False).shape == (2, *PATCH, 2)
    heads1, _ = build_model(tiny(deep_supervision=False)).apply(variables, x, train=True, mutable=["batch_stats"])
    assert len(heads1) == 1


@pytest.mark.parametrize("shape,axis", [((24, 16, 16), "depth"), ((16, 8, 16), "height"), ((16, 16, 20), "width")])
def test_patch_not_divisible_names_the_axis(shape, axis):
    with pytest.raises(ValueError, match=rf"{axis} = \d+ is not divisible by 16"):
        build_model(tiny()).apply(_variables(), np.zeros((1, *shape, 1), np.float32))


@pytest.mark.parametrize("c_in,features", [(3, 8), (8, 8)])
def test_residual_inception_block_concatenates_branches_and_adds_the_shortcut(c_in, features):
    """Each branch equals its own Conv-BN-ReLU chain; their concatenation feeds `fuse`; the output is
    ReLU(fuse + shortcut), the shortcut being the input itself when the widths agree."""
    act = activation_fn(ACTIVATION)
    block = ResInceptionBlock(features, act)
    x = _input(1, (8, 8, 8), c_in)
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


def test_bfloat16_forward_agrees_with_float32():
    x = _input(2)
    want = build_model(tiny()).apply(_variables(), x, train=False)
    got = build_model(tiny(dtype="bfloat16")).apply(_variables(), x, train=False)
    assert got.dtype == jnp.float32 and parity.errors(want, got)[1] < 5e-2


def test_reparameterized_model_reproduces_evaluation_model():
    x = _input(3)
    want = build_model(tiny()).apply(_variables(), x, train=False)
    deploy_vars = reparameterize(_variables())
    deploy = build_model(tiny(), deploy=True)
    assert jax.tree.structure(variable_shapes(deploy)) == jax.tree.structure(deploy_vars)
    got = deploy.apply(deploy_vars, x, train=False)
    assert parity.errors(want, got)[1] < 1e-5


# ------------------------------------------------------------------------------------------------
# PyTorch twin and converter.

torch = pytest.importorskip("torch")
from livseg_jax.interop import torch_models as tm  # noqa: E402

torch.set_num_threads(2)


def test_eval_heads_and_deploy_folds_agree_with_the_torch_twin():
    # Every head in both directions, and the torch and Flax deploy folds (tests/network_checks.py).
    checks.check_torch_parity("riunet")


@pytest.mark.parametrize("deploy", [False, True])
def test_round_trip_torch_flax_torch_is_exact(deploy):
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(tiny(), deploy=deploy), seed=8)
    state_dict = parity.torch_state_numpy(torch_model)
    variables = mapping.state_dict_to_variables(state_dict, tiny())
    assert ("batch_stats" in variables) == (not deploy)
    back = mapping.variables_to_state_dict(variables, tiny())
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_conversion_lists_missing_unexpected_and_mismatched_keys():
    cfg = tiny()
    state_dict = parity.torch_state_numpy(tm.torch_model_from_config(cfg))
    del state_dict["enc1.branch5.conv2.conv.weight"]
    state_dict["dec0.branch7.conv0.bn.weight"] = np.ones(3, np.float32)
    state_dict["head3.bias"] = np.zeros(5, np.float32)
    with pytest.raises(mapping.ConversionError) as err:
        mapping.state_dict_to_variables(state_dict, cfg)
    e = err.value
    assert e.missing == ["params/enc1/branch5/conv2/conv/kernel"]
    assert e.unexpected == ["dec0.branch7.conv0.bn.weight -> params/dec0/branch7/conv0/bn/scale"]
    assert len(e.mismatched) == 1 and e.mismatched[0].startswith("head3.bias (5,)")

    wide = tiny(features=(4, 8, 8, 8, 16))
    with pytest.raises(mapping.ConversionError) as err:
        mapping.state_dict_to_variables(parity.torch_state_numpy(tm.torch_model_from_config(wide)), cfg)
    assert err.value.mismatched and not err.value.missing
