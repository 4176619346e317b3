"""UNet 3+ (models/unet3plus.py): shapes, full-scale skips, deploy form, PyTorch twin, converter."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax.config import model_config
from livseg_jax.interop import mapping
from livseg_jax.models import build_model, reparameterize
from livseg_jax.models.layers import ConvBN, activation_fn
from livseg_jax.models.unet3plus import ACTIVATION, max_pool, upsample
from tools import parity

FEATURES = (4, 8, 8, 8, 8)
CAT = 4
PATCH = (16, 16, 16)
LEVELS = len(FEATURES)
TOL = 1e-4


def tiny(**overrides):
    cfg = model_config("unet3plus")
    cfg.features = FEATURES
    cfg.cat_channels = CAT
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _input(seed=0, patch=PATCH):
    return np.random.default_rng(seed).normal(size=(2, *patch, 1)).astype(np.float32)


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
    assert len(heads) == LEVELS  # bottleneck + four decoder levels, as the paper
    assert all(h.shape == (2, *PATCH, 2) for h in heads)
    assert sorted(variables["params"]) == sorted(
        [f"enc{s}" for s in range(LEVELS - 1)] + ["bottleneck"] + [f"dec{i}" for i in range(LEVELS - 1)]
        + [f"head{i}" for i in range(LEVELS)])
    assert variables["params"]["head0"]["kernel"].shape == (3, 3, 3, FEATURES[-1], 2)
    assert variables["params"]["head4"]["kernel"].shape == (3, 3, 3, LEVELS * CAT, 2)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["enc0"]["conv0"]["conv"]["kernel"]).sum()) > 0

    out = model.apply(variables, x, train=False)
    assert out.shape == (2, *PATCH, 2)
    single = build_model(tiny(deep_supervision=False))
    heads1, _ = single.apply(variables, x, train=True, mutable=["batch_stats"])
    assert len(heads1) == 1 and heads1[0].shape == (2, *PATCH, 2)


@pytest.mark.parametrize("shape,axis", [((24, 16, 16), "depth"), ((16, 8, 16), "height"), ((16, 16, 20), "width")])
def test_patch_not_divisible_names_the_axis(shape, axis):
    with pytest.raises(ValueError, match=rf"{axis} = \d+ is not divisible by 16"):
        build_model(tiny()).apply(_variables(), np.zeros((1, *shape, 1), np.float32))


def test_every_decoder_level_receives_all_five_scales():
    """dec<i>'s fused input is L blocks of CAT channels; block j is scale<j> of source j resampled
    (max-pooled from finer encoder maps, trilinearly up-sampled from coarser decoder maps)."""
    model = build_model(tiny())
    variables = _variables()
    _, state = model.apply(variables, _input(1), train=False, capture_intermediates=True,
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
            unit = {c: variables[c][f"dec{i}"][f"scale{j}"] for c in variables}
            want = ConvBN(CAT, (3, 3, 3), act=act).apply(unit, src, train=False)
            np.testing.assert_allclose(fused[..., j * CAT:(j + 1) * CAT], want, rtol=1e-5, atol=1e-5)
            assert float(jnp.std(want)) > 1e-3  # each block carries signal
    # And every scale matters: zeroing one source's unit changes the finest fused input.
    for j in range(LEVELS):
        params = jax.tree_util.tree_map(lambda a: a, variables["params"])
        params["dec0"][f"scale{j}"]["bn"]["scale"] = np.zeros(CAT, np.float32)
        _, st = model.apply({**variables, "params": params}, _input(1), train=False,
                            capture_intermediates=True, mutable=["intermediates"])
        diff = np.abs(np.asarray(st["intermediates"]["dec0"]["fused_input"][0]) - np.asarray(
            inter["dec0"]["fused_input"][0])).reshape(-1, LEVELS, CAT).max(axis=(0, 2))
        assert diff[j] > 0 and np.all(np.delete(diff, j) == 0)


def test_bfloat16_forward_agrees_with_float32():
    x = _input(2)
    want = build_model(tiny()).apply(_variables(), x, train=False)
    got = build_model(tiny(dtype="bfloat16")).apply(_variables(), x, train=False)
    assert got.dtype == jnp.float32
    assert parity.errors(want, got)[1] < 5e-2


def test_reparameterized_model_reproduces_evaluation_model():
    x = _input(3)
    want = build_model(tiny()).apply(_variables(), x, train=False)
    deploy_vars = reparameterize(_variables())
    assert "batch_stats" not in deploy_vars
    assert sorted(k for k in deploy_vars["params"] if k.startswith("head")) == ["head4"]
    got = build_model(tiny(), deploy=True).apply(deploy_vars, x, train=False)
    assert parity.errors(want, got)[1] < 1e-5


# ------------------------------------------------------------------------------------------------
# PyTorch twin and converter.

torch = pytest.importorskip("torch")
from livseg_jax.interop import torch_models as tm  # noqa: E402

torch.set_num_threads(2)


def _assert_heads_close(torch_heads, flax_heads, n):
    assert len(torch_heads) == len(flax_heads) == n
    for i, (t, f) in enumerate(zip(torch_heads, flax_heads, strict=True)):
        max_abs, rel = parity.errors(t, np.asarray(f))
        assert rel <= TOL, f"head {i}: max |diff| {max_abs:.3g}, relative {rel:.3g}"


def test_eval_heads_agree_both_directions():
    x = _input(4)
    flax_eval = parity.flax_eval_all_heads(build_model(tiny()))
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(tiny()), seed=1).eval()
    variables = mapping.state_dict_to_variables(parity.torch_state_numpy(torch_model), tiny())
    _assert_heads_close(parity.torch_forward(torch_model, x), flax_eval(variables, x), LEVELS)

    state_dict = mapping.variables_to_state_dict(_variables(5), tiny())
    torch_model = parity.load_torch_state_numpy(tm.torch_model_from_config(tiny()), state_dict).eval()
    _assert_heads_close(parity.torch_forward(torch_model, x), flax_eval(_variables(5), x), LEVELS)


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


def test_deploy_models_agree_across_frameworks():
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(tiny()), seed=9).eval()
    variables = mapping.state_dict_to_variables(parity.torch_state_numpy(torch_model), tiny())
    torch_deploy = tm.reparameterize_torch(torch_model).eval()
    flax_deploy = reparameterize(variables)
    exported = mapping.variables_to_state_dict(flax_deploy, tiny())
    folded = parity.torch_state_numpy(torch_deploy)
    assert exported.keys() == folded.keys()
    for key in folded:
        np.testing.assert_allclose(exported[key], folded[key], rtol=1e-6, atol=1e-7, err_msg=key)
    x = _input(6)
    deploy_f = build_model(tiny(), deploy=True).apply(flax_deploy, x, train=False)
    _assert_heads_close(parity.torch_forward(torch_deploy, x), (deploy_f,), 1)
    assert parity.errors(parity.torch_forward(torch_model, x)[-1], deploy_f)[1] <= TOL


def test_conversion_lists_missing_unexpected_and_mismatched_keys():
    cfg = tiny()
    state_dict = parity.torch_state_numpy(tm.torch_model_from_config(cfg))
    del state_dict["dec1.scale3.conv.weight"]
    state_dict["dec9.fuse.bn.weight"] = np.ones(3, np.float32)
    state_dict["head4.bias"] = np.zeros(5, np.float32)
    with pytest.raises(mapping.ConversionError) as err:
        mapping.state_dict_to_variables(state_dict, cfg)
    e = err.value
    assert e.missing == ["params/dec1/scale3/conv/kernel"]
    assert e.unexpected == ["dec9.fuse.bn.weight -> params/dec9/fuse/bn/scale"]
    assert len(e.mismatched) == 1 and e.mismatched[0].startswith("head4.bias (5,)")

    wide = tiny(cat_channels=CAT + 1)
    with pytest.raises(mapping.ConversionError) as err:
        mapping.state_dict_to_variables(parity.torch_state_numpy(tm.torch_model_from_config(wide)), cfg)
    assert err.value.mismatched and not err.value.missing
