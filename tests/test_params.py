"""Parameters checked without tracing their initialisers when a model is applied (models/params.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.errors import ScopeParamShapeError

from livseg_jax.config import base_config
from livseg_jax.models import build_model
from livseg_jax.models.params import BatchNorm, Conv


def counting(init, calls):
    def counted(key, shape, dtype=jnp.float32):
        calls.append(tuple(shape))
        return init(key, shape, dtype)
    return counted


def test_apply_does_not_run_the_initialisers_and_init_gives_flax_values():
    # Flax traces a parameter's initialiser on every apply to check its shape; these modules give
    # that check zeros of the shape instead. In init the initialiser runs, with Flax's values.
    calls = []
    conv = Conv(4, (3, 3), kernel_init=counting(nn.initializers.lecun_normal(), calls))
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
    variables = conv.init(jax.random.key(0), x)
    assert calls == [(3, 3, 3, 4)]
    reference = nn.Conv(4, (3, 3)).init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, variables, reference)

    out = conv.apply(variables, x)
    jax.jit(conv.apply)(variables, x)
    assert calls == [(3, 3, 3, 4)]  # neither apply nor its trace called it
    np.testing.assert_allclose(out, nn.Conv(4, (3, 3)).apply(reference, x), rtol=1e-6)

    norm = BatchNorm(use_running_average=False, scale_init=counting(nn.initializers.ones, calls))
    stats = norm.init(jax.random.key(0), x)
    assert len(calls) == 2
    y, _ = norm.apply(stats, x, mutable=["batch_stats"])
    assert len(calls) == 2
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)


def test_a_parameter_of_another_shape_is_still_refused():
    x = jnp.ones((1, 6, 6, 2))
    variables = Conv(3, (3, 3)).init(jax.random.key(0), x)
    with pytest.raises(ScopeParamShapeError):
        Conv(5, (3, 3)).apply(variables, x)  # a checkpoint that does not fit the config


def test_the_network_in_the_gpu_forms_traces_no_initialiser_when_applied(monkeypatch):
    # Every parameter of the paper's network, in every form, goes through the quick check: Flax's
    # shape check (a `jax.eval_shape` of the initialiser per parameter) traces a key and zeros, not
    # lecun_normal's truncated normal (about a fifth of the train step's tracing).
    config = base_config()
    config.model.update(features=(4, 8, 8, 8, 8), depthwise_impl="shift", pointwise_impl="einsum",
                        dense_pack_channels=8, batch_norm_impl="two_stage")
    model = build_model(config.model, deploy=False)
    x = jnp.ones((1, 16, 16, 16, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
    checks, real = [], jax.eval_shape

    def measured(fun, *args, **kwargs):  # Flax's check traces a function of no arguments
        if not args and not kwargs:
            checks.append(len(jax.make_jaxpr(fun)().eqns))
        return real(fun, *args, **kwargs)

    monkeypatch.setattr(jax, "eval_shape", measured)
    jax.make_jaxpr(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    assert len(checks) == len(jax.tree.leaves(variables["params"])) > 50
    assert max(checks) <= 3, checks  # the key and the zeros
    checks.clear()
    Conv(4, (3, 3)).apply({"params": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)}}, x[0])
    nn.Conv(4, (3, 3)).apply({"params": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)}}, x[0])
    assert checks[0] <= 3 < checks[2]  # the probe sees an initialiser when Flax traces one
