"""Helpers shared by several test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

import jax
import numpy as np

from livseg_jax.models import variable_shapes


def random_unet_variables(model, window, seed=0):
    """Returns random variables for `model` (shapes from eval_shape, no compiled init).

    Running variances are drawn from [0.5, 2] so BatchNorm stays well defined; everything else
    from N(0, 0.4).
    """
    shapes = variable_shapes(model, window)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if getattr(path[-1], "key", "") == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        return rng.normal(0.0, 0.4, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)
