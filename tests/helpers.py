"""Helpers shared by several test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

import jax
import jax.numpy as jnp
import numpy as np


def random_unet_variables(model, window, seed=0):
    """Returns random variables for `model` (shapes from eval_shape, no compiled init).

    Running variances are drawn from [0.5, 2] so BatchNorm stays well defined; everything else
    from N(0, 0.4).
    """
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, *window, 1)), train=True))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if getattr(path[-1], "key", "") == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        return rng.normal(0.0, 0.4, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)
