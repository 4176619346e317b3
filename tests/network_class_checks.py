"""Checks every comparison network (SPEC 1.5) must pass, shared by tests/test_<network>.py.

`NetworkChecks(name)` builds the tiny network once; each method is one check of NET_COMMON's list
(shapes, gradients, bf16, patch error, deploy form, PyTorch parity, converter).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax.config import model_config
from livseg_jax.interop import mapping
from livseg_jax.models import build_model, init_variables, names, reparameterize, variable_shapes
from livseg_jax.models.forms import REFERENCE_FORMS

PATCH = (16, 16, 16)
FEATURES = (4, 8, 8, 8, 8)
BATCH = 2
TOL = 1e-4


def tiny_config(name, **overrides):
    cfg = model_config(name)
    cfg.features = FEATURES
    cfg.update(REFERENCE_FORMS)
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def rel_error(reference, other) -> float:
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    return float(np.max(np.abs(reference - other)) / np.max(np.abs(reference)))


class NetworkChecks:
    """The shared checks for network `name` at tiny widths (lazy, cached)."""

    def __init__(self, name: str, n_heads: int = len(FEATURES) - 1, divisor: int = 2 ** (len(FEATURES) - 1)):
        self.name = name
        self.cfg = tiny_config(name)
        self.model = build_model(self.cfg)
        self.n_heads, self.divisor = n_heads, divisor
        self.x = jax.random.normal(jax.random.key(1), (BATCH, *PATCH, 1), jnp.float32)

    @functools.cached_property
    def variables(self):
        """Random variables with non-trivial BatchNorm statistics (tools/parity.py's draws)."""
        from tools import parity

        return jax.tree.map(jnp.asarray, parity.random_flax_variables(variable_shapes(self.model, PATCH)))

    @functools.cached_property
    def eval_out(self):
        return jax.jit(lambda v, x: self.model.apply(v, x, train=False))(self.variables, self.x)

    def check_shapes_and_gradients(self):
        variables = init_variables(self.model, jax.random.key(0), PATCH)

        def loss(params):
            heads, _ = self.model.apply({**variables, "params": params}, self.x, train=True,
                                        mutable=["batch_stats"])
            return sum(jnp.mean(h ** 2) for h in heads), heads

        (_, heads), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        assert isinstance(heads, tuple) and len(heads) == self.n_heads
        assert all(h.shape == (BATCH, *PATCH, 2) and h.dtype == jnp.float32 for h in heads)
        leaves = jax.tree.leaves(grads)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        assert all(float(jnp.abs(grads[f"{names.HEAD}{i}"]["kernel"]).sum()) > 0 for i in range(self.n_heads))
        assert self.eval_out.shape == (BATCH, *PATCH, 2)
        one = build_model(tiny_config(self.name, deep_supervision=False))
        heads1, _ = one.apply(variables, self.x, train=True, mutable=["batch_stats"])
        assert len(heads1) == 1 and heads1[0].shape == (BATCH, *PATCH, 2)

    def check_bf16(self):
        model16 = build_model(tiny_config(self.name, dtype="bfloat16"))
        out16 = jax.jit(lambda v, x: model16.apply(v, x, train=False))(self.variables, self.x)
        assert out16.dtype == jnp.float32
        assert rel_error(self.eval_out, out16) < 5e-2

    def check_bad_patch(self):
        factor = 2 ** (self.n_heads)
        h = factor // 2
        for shape, axis in (((16, 16 + h, 16), "height"), ((16 + h // 2, 16, 16), "depth"), ((16, 16, h), "width")):
            with pytest.raises(ValueError, match=rf"{axis} = \d+ is not divisible by {factor}"):
                variable_shapes(self.model, shape)

    def check_deploy(self):
        stats_paths = {tuple(getattr(p, "key", p) for p in path[:-1])
                       for path, _ in jax.tree_util.tree_leaves_with_path(self.variables["batch_stats"])}
        assert stats_paths and all(p[-1] in names.NORM_MODULES for p in stats_paths)
        deploy_vars = reparameterize(self.variables)
        deploy = build_model(self.cfg, deploy=True)
        got = jax.jit(lambda v, x: deploy.apply(v, x, train=False))(deploy_vars, self.x)
        assert rel_error(self.eval_out, got) <= 1e-5
        assert set(deploy_vars) == {"params"}
        flat = mapping.flatten(deploy_vars)
        assert not any(re.search(rf"/{names.BN}/", p) for p in flat)  # every conv + BN pair folded
        reference = variable_shapes(deploy, PATCH)
        assert jax.tree.structure(reference) == jax.tree.structure(jax.tree.map(jnp.asarray, deploy_vars))
        assert jax.tree.map(lambda s: s.shape, reference) == jax.tree.map(lambda a: a.shape, deploy_vars)

    def check_torch_parity(self):
        from livseg_jax.interop import torch_models as tm
        from tools import parity

        cfg, x = self.cfg, np.array(self.x)
        torch_model = parity.randomize_torch_(tm.torch_model_from_config(cfg), seed=1).eval()
        variables = mapping.state_dict_to_variables(parity.torch_state_numpy(torch_model), cfg)
        flax_heads = parity.flax_eval_all_heads(self.model)(variables, x)
        torch_heads = parity.torch_forward(torch_model, x)
        assert len(flax_heads) == len(torch_heads) == self.n_heads
        for i, (t, f) in enumerate(zip(torch_heads, flax_heads, strict=True)):
            assert t.shape == (BATCH, *PATCH, 2)
            assert rel_error(t, f) <= TOL, f"head {i}"
        # Flax -> torch: the exported weights give the same evaluation output.
        exported = parity.load_torch_state_numpy(tm.torch_model_from_config(cfg),
                                                 mapping.variables_to_state_dict(self.variables, cfg)).eval()
        assert rel_error(self.eval_out, parity.torch_forward(exported, x, all_heads=False)[0]) <= TOL
        # Deploy forms: both folds give the same weights and outputs.
        torch_deploy = tm.reparameterize_torch(torch_model).eval()
        flax_deploy = reparameterize(variables)
        folded = parity.torch_state_numpy(torch_deploy)
        exported = mapping.variables_to_state_dict(flax_deploy, cfg)
        assert exported.keys() == folded.keys()
        for key in folded:
            np.testing.assert_allclose(exported[key], folded[key], rtol=1e-6, atol=1e-7, err_msg=key)
        deploy = build_model(cfg, deploy=True)
        out_f = deploy.apply(flax_deploy, x, train=False)
        assert rel_error(torch_heads[-1], parity.torch_forward(torch_deploy, x)[-1]) <= TOL
        assert rel_error(torch_heads[-1], out_f) <= TOL

    def check_converter(self, missing_key: str):
        """Round trips (both forms) are exact; a broken state dict is reported key by key."""
        from livseg_jax.interop import torch_models as tm
        from tools import parity

        cfg = self.cfg
        for deploy in (False, True):
            torch_model = parity.randomize_torch_(tm.torch_model_from_config(cfg, deploy=deploy), seed=8)
            state_dict = parity.torch_state_numpy(torch_model)
            variables = mapping.state_dict_to_variables(state_dict, cfg)
            assert ("batch_stats" in variables) == (not deploy)
            back = mapping.variables_to_state_dict(variables, cfg)
            assert list(back) == list(state_dict)
            for key, value in state_dict.items():
                assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
        state_dict = parity.torch_state_numpy(tm.torch_model_from_config(cfg))
        del state_dict[missing_key]
        state_dict["enc9.proj.weight"] = np.ones((3, 3, 1, 1, 1), np.float32)
        state_dict["head0.bias"] = np.zeros(5, np.float32)
        with pytest.raises(mapping.ConversionError) as err:
            mapping.state_dict_to_variables(state_dict, cfg)
        e = err.value
        assert e.missing == [mapping.map_name(missing_key).flax_path]
        assert e.unexpected == ["enc9.proj.weight -> params/enc9/proj/kernel"]
        assert len(e.mismatched) == 1 and e.mismatched[0].startswith("head0.bias (5,)")
        # Flax -> torch: a missing statistic and an extra leaf are named.
        variables = jax.tree.map(np.asarray, self.variables)
        variables["params"]["extra"] = {"kernel": np.zeros(2, np.float32)}
        stats_key = sorted(variables["batch_stats"])[0]
        del variables["batch_stats"][stats_key]
        with pytest.raises(mapping.ConversionError) as err:
            mapping.variables_to_state_dict(variables, cfg, deploy=False)
        assert err.value.unexpected == ["params/extra/kernel"]
        assert err.value.missing and all(m.startswith(f"batch_stats/{stats_key}/") for m in err.value.missing)

    def check_forms(self):
        """The GPU computation forms (einsum 1x1, packed 3x3x3, shift depthwise) keep the parameter
        tree and match the reference forms, evaluation and deploy (max-normalised: deep networks
        accumulate float32 rounding elementwise)."""
        fast_cfg = tiny_config(self.name, depthwise_impl="shift", pointwise_impl="einsum", dense_pack_channels=32)
        fast = build_model(fast_cfg)
        reference = variable_shapes(self.model, PATCH)
        assert jax.tree.structure(variable_shapes(fast, PATCH)) == jax.tree.structure(reference)
        got = jax.jit(lambda v, x: fast.apply(v, x, train=False))(self.variables, self.x)
        assert rel_error(self.eval_out, got) <= TOL
        deployed = build_model(fast_cfg, deploy=True)
        folded = jax.jit(lambda v, x: deployed.apply(v, x, train=False))(reparameterize(self.variables), self.x)
        assert rel_error(self.eval_out, folded) <= TOL
