"""Checks every comparison network must pass (issue 16), shared by tests/test_<network>.py.

Tiny widths and a 16^3 patch; each function is one test's body, called with the network's name.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax.config import model_config
from livseg_jax.interop import mapping
from livseg_jax.models import build_model, reparameterize
from livseg_jax.models.forms import REFERENCE_FORMS
from tools import parity

FEATURES = (4, 8, 8, 8, 8)
PATCH = (16, 16, 16)
BATCH = 2
TOL = 1e-4  # PyTorch parity: max |difference| / max |reference|


def tiny(name: str, **overrides) -> object:
    cfg = model_config(name)
    cfg.features = FEATURES
    cfg.update(REFERENCE_FORMS)
    cfg.update(overrides)
    return cfg


def inputs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(BATCH, *PATCH, 1)).astype(np.float32)


@functools.cache
def variables(name: str, seed: int = 0) -> dict:
    """Random variables with non-trivial BatchNorm statistics (numpy)."""
    return parity.random_flax_variables(mapping.flax_variable_shapes(tiny(name)), seed)


def check_training_heads_and_gradients(name: str) -> None:
    model = build_model(tiny(name))
    v = variables(name)
    x = jnp.asarray(inputs())
    labels = (x[..., 0] > 0).astype(jnp.int32)

    def loss_fn(params):
        outs, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                              mutable=["batch_stats"])
        loss = sum(jnp.mean(-jnp.take_along_axis(nn.log_softmax(o), labels[..., None], -1)) for o in outs)
        return loss, outs

    grads, outs = jax.jit(jax.grad(loss_fn, has_aux=True))(v["params"])
    assert len(outs) == len(FEATURES) - 1
    assert all(o.shape == (BATCH, *PATCH, 2) and o.dtype == jnp.float32 for o in outs)
    # Coarse to fine: head i reads decoder level len - 2 - i.
    widths = [v["params"][f"head{i}"]["kernel"].shape[-2] for i in range(len(outs))]
    assert widths == list(FEATURES[-2::-1])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert all(float(jnp.abs(grads[f"head{i}"]["kernel"]).sum()) > 0 for i in range(len(outs)))
    single = build_model(tiny(name, deep_supervision=False))
    outs1, _ = jax.jit(lambda v, x: single.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert len(outs1) == 1 and outs1[0].shape == (BATCH, *PATCH, 2)
    evaluated = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    assert evaluated.shape == (BATCH, *PATCH, 2)
    np.testing.assert_allclose(evaluated, parity.flax_eval_all_heads(model)(v, x)[-1], rtol=1e-5, atol=1e-5)


def check_bfloat16_close_to_float32(name: str) -> None:
    v, x = variables(name), inputs()
    f32 = jax.jit(lambda v, x: build_model(tiny(name)).apply(v, x, train=False))(v, x)
    bf16 = jax.jit(lambda v, x: build_model(tiny(name, dtype="bfloat16")).apply(v, x, train=False))(v, x)
    assert bf16.dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(bf16 - f32)) / jnp.max(jnp.abs(f32)))
    assert rel < 5e-2, rel


def check_bad_patch_names_axis_and_divisor(name: str) -> None:
    model = build_model(tiny(name))
    with pytest.raises(ValueError, match=r"height = 24 is not divisible by 16"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 24, 16, 1)), train=False))


def check_deploy_form_reproduces_evaluation(name: str) -> None:
    v, x = variables(name), inputs(1)
    expected = jax.jit(lambda v, x: build_model(tiny(name)).apply(v, x, train=False))(v, x)
    deploy = build_model(tiny(name), deploy=True)
    folded = reparameterize(v)
    got = jax.jit(lambda v, x: deploy.apply(v, x, train=False))(folded, x)
    rel = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
    assert rel <= 1e-5, rel
    shapes = mapping.flax_variable_shapes(tiny(name), deploy=True)
    assert jax.tree.structure(shapes) == jax.tree.structure(jax.tree.map(jnp.asarray, folded))


def check_torch_parity(name: str) -> None:
    """Evaluation mode, every head, both directions; and the torch deploy fold."""
    tm = pytest.importorskip("livseg_jax.interop.torch_models")
    cfg = tiny(name)
    x = inputs(2)
    all_heads = parity.flax_eval_all_heads(build_model(cfg))
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(cfg), seed=1).eval()
    imported = mapping.state_dict_to_variables(parity.torch_state_numpy(torch_model), cfg)
    exported = mapping.variables_to_state_dict(variables(name), cfg)
    other = parity.load_torch_state_numpy(tm.torch_model_from_config(cfg), exported).eval()
    for t_model, flax_vars in ((torch_model, imported), (other, variables(name))):
        t_heads, f_heads = parity.torch_forward(t_model, x), all_heads(flax_vars, x)
        assert len(t_heads) == len(f_heads) == len(FEATURES) - 1
        for i, (t, f) in enumerate(zip(t_heads, f_heads, strict=True)):
            assert t.shape == (BATCH, *PATCH, 2)
            max_abs, rel = parity.errors(t, np.asarray(f))
            assert rel <= TOL, f"head {i}: max |diff| {max_abs:.3g}, relative {rel:.3g}"
    # Deploy: the torch fold and the Flax fold give the same weights and outputs.
    torch_deploy = tm.reparameterize_torch(torch_model).eval()
    flax_deploy = reparameterize(imported)
    folded = parity.torch_state_numpy(torch_deploy)
    from_flax = mapping.variables_to_state_dict(flax_deploy, cfg)
    assert folded.keys() == from_flax.keys()
    for key in folded:
        np.testing.assert_allclose(from_flax[key], folded[key], rtol=1e-6, atol=1e-7, err_msg=key)
    deploy_out = parity.torch_forward(torch_deploy, x)[-1]
    assert parity.errors(parity.torch_forward(torch_model, x)[-1], deploy_out)[1] <= TOL


def check_converter_round_trip_and_report(name: str, drop_key: str, drop_path: str) -> None:
    """Exact torch -> flax -> torch in both forms; missing / unexpected / mismatched keys reported.

    `drop_key` is a torch key of the network, `drop_path` its Flax path.
    """
    tm = pytest.importorskip("livseg_jax.interop.torch_models")
    cfg = tiny(name)
    for deploy in (False, True):
        state = parity.torch_state_numpy(parity.randomize_torch_(tm.torch_model_from_config(cfg, deploy), seed=3))
        v = mapping.state_dict_to_variables(state, cfg)
        assert ("batch_stats" in v) == (not deploy)
        back = mapping.variables_to_state_dict(v, cfg)
        assert list(back) == list(state)
        assert all(back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]) for k in state)
    state = parity.torch_state_numpy(tm.torch_model_from_config(cfg))
    del state[drop_key]
    state["stray9.conv.weight"] = np.ones((1, 1, 1, 1, 1), np.float32)
    state["head0.bias"] = np.zeros(5, np.float32)
    with pytest.raises(mapping.ConversionError) as err:
        mapping.state_dict_to_variables(state, cfg)
    e = err.value
    assert e.missing == [drop_path]
    assert e.unexpected == ["stray9.conv.weight -> params/stray9/conv/kernel"]
    assert len(e.mismatched) == 1 and e.mismatched[0].startswith("head0.bias (5,)")
    assert "missing (1)" in str(e) and "stray9" in str(e)
