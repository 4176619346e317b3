"""Parameters declared so that applying a model does not trace their initialisers.

Outside `init`, Flax's `Scope.param` checks that each existing parameter has the shape the module
asks for by tracing the parameter's initialiser under `jax.eval_shape` (flax 0.12's
`flax/core/scope.py`): a truncated normal per convolution kernel, hundreds of operations thrown
away. For the paper network's 396 parameters that was about a fifth of tracing the train step's
gradient program on this project's 2-core CPU machine (2.95-3.16 s against 2.42-2.50 s without it,
`experiments/bench_trace.py`), and the step's tracing is on the first step's critical path
(docs/benchmarks.md, session 13).

`QuickParamCheck` keeps that check and gives it zeros of the requested shape to compare with
instead: the same shapes, so the same errors for a checkpoint that does not fit the config; in
`init` the real initialiser runs as before, so initial values are unchanged. It assumes Flax's
initialiser convention `init(key, shape, dtype=...)`, which every parameter of this package uses.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def zeros_of_shape(key: Any, shape: Any, dtype: Any = jnp.float32, *args: Any, **kwargs: Any) -> Any:
    """An initialiser with the shape check's only use of one: the shape (and dtype) it returns."""
    del key, args, kwargs
    return jnp.zeros(shape, dtype)


class QuickParamCheck:
    """Mixin for a Flax module (before `nn.Module` in its bases): see the module docstring."""

    @nn.nowrap
    def param(self, name: str, init_fn: Any, *init_args: Any, unbox: bool = True, **init_kwargs: Any) -> Any:
        if not self.is_initializing():
            init_fn = zeros_of_shape
        return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)


class Conv(QuickParamCheck, nn.Conv):
    """`flax.linen.Conv`, applied without tracing its initialisers."""


class BatchNorm(QuickParamCheck, nn.BatchNorm):
    """`flax.linen.BatchNorm`, applied without tracing its initialisers."""
