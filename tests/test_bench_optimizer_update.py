"""experiments/bench_optimizer_update.py: every form gives the gradient norm and takes Adam's step;
the fusion count is read from the compiled program."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.bench_optimizer_update import FORMS, form_optimizer, fusion_count, gradient_norm, make_update
from livseg_jax.config import base_config
from livseg_jax.training.schedules import make_optimizer


def tree(seed):
    rng = np.random.default_rng(seed)
    return {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": {"c": jnp.asarray(rng.normal(size=7),
                                                                                           jnp.float32)}}


def test_every_norm_form_is_the_global_l2_norm():
    grads = tree(0)
    want = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads)))
    for form in FORMS:
        np.testing.assert_allclose(float(gradient_norm(grads, form)), want, rtol=1e-6)


def test_every_form_takes_the_same_adam_step_and_count_fusions():
    optim_config = ml_collections.ConfigDict(base_config().optim)
    optimizer = make_optimizer(optim_config, 100)
    grads = tree(1)
    results = []
    for form in FORMS:
        params = tree(2)
        opt_state = form_optimizer(optim_config, form).init(params)
        compiled = make_update(optim_config, form).lower(params, opt_state, grads).compile()
        assert fusion_count(compiled.as_text()) > 0
        results.append(compiled(params, opt_state, grads))
    want_updates, _ = optimizer.update(grads, optimizer.init(tree(2)), tree(2))
    want = optax.apply_updates(tree(2), want_updates)
    # the forms the package could train with keep the package optimiser's state layout
    for form in ("per_leaf", "flat_norm"):
        assert jax.tree.structure(form_optimizer(optim_config, form).init(tree(2))) == \
            jax.tree.structure(optimizer.init(tree(2)))
    for new_params, _, _ in results:
        for got, ref in zip(jax.tree.leaves(new_params), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert fusion_count("no entry here") == -1
