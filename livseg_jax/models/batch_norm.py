"""BatchNorm with two interchangeable training computations of the same variables.

`impl="flax"` is `flax.linen.BatchNorm` (the reference). `impl="two_stage"` computes the same
statistics and normalisation with its backward pass written out (`jax.custom_vjp`): the scale and
bias gradients are two sums of the output gradient (alone and times the normalised input), and the
input gradient is one elementwise pass over them and the input. Its sums are written in two stages,
first along the last spatial axis only, then over the rest. The optimised GPU program shows that
XLA merges the two stages back into one reduction and splits it its own way, so what this form
changes in practice is the backward pass's structure. On an H200 it took the paper network's bf16
train step from 44.7 to 43.8 ms (docs/benchmarks.md, session 9); the reductions were the largest
kernel kind of that step (20.2 of 50.8 ms on an H100, docs/performance_notes.md).

Both forms declare the same variables as `flax.linen.BatchNorm` (params `scale`, `bias`; batch_stats
`mean`, `var`), update the running averages the same way, and run evaluation identically (the
evaluation form is Flax's own), so checkpoints, converted weights and the deploy folding do not
depend on the form.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from livseg_jax.models.params import QuickParamCheck

Array = jax.Array
Dtype = Any
IMPLS = ("flax", "two_stage")


def _channel_sum(x: Array) -> Array:
    """Sums a float32 (B, *S, C) map over every axis but the last: the last spatial axis first."""
    if x.ndim > 2:
        x = jnp.sum(x, axis=x.ndim - 2)
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


def _statistics(x: Array) -> tuple[Array, Array]:
    """Returns the float32 per-channel mean and (biased, fast) variance of (B, *S, C), as Flax's."""
    count = x.size // x.shape[-1]
    xf = x.astype(jnp.float32)
    mean = _channel_sum(xf) / count
    mean_square = _channel_sum(xf * xf) / count
    return mean, jnp.maximum(0.0, mean_square - mean * mean)


def batch_norm_train_reference(x: Array, scale: Array, bias: Array, epsilon: float):
    """Returns (y, mean, var): training-mode BatchNorm of (B, *S, C), statistics over all but C,
    differentiated by autodiff. All three are float32 (the caller casts `y`)."""
    mean, var = _statistics(x)
    y = (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
    return y, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float):
    """`batch_norm_train_reference` with a written-out backward pass whose sums are two-stage."""
    return batch_norm_train_reference(x, scale, bias, epsilon)


def _forward(x, scale, bias, epsilon):
    y, mean, var = batch_norm_train_reference(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)


def _backward(epsilon, residuals, cotangents):
    x, scale, mean, var = residuals
    dy, dmean, dvar = cotangents
    count = x.size // x.shape[-1]
    inv = jax.lax.rsqrt(var + epsilon)
    centred = x.astype(jnp.float32) - mean
    x_hat = centred * inv
    g = dy.astype(jnp.float32)
    grad_bias = _channel_sum(g)
    grad_scale = _channel_sum(g * x_hat)
    # d/dx of (x - mean) * inv * scale with mean and var functions of x (the usual BatchNorm
    # gradient), plus the direct uses of the returned statistics (zero in training: only the
    # running averages read them). The variance's clip at 0 is not differentiated: it only binds
    # when rounding makes E[x^2] - E[x]^2 negative, where Flax's gradient through the variance is 0
    # and this one is not; there the centred values are themselves rounding noise, so both
    # gradients agree to rounding (tested with constant and near-constant channels).
    grad_x = (scale * inv) * (g - (grad_bias + x_hat * grad_scale) / count)
    grad_x = grad_x + dmean / count + dvar * (2.0 / count) * centred
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(scale.dtype)


batch_norm_train.defvjp(_forward, _backward)


class TwoStageBatchNorm(QuickParamCheck, nn.Module):
    """Training-mode BatchNorm over all but the last axis with two-stage sums (see the module doc).

    Declares `flax.linen.BatchNorm`'s variables with its initialisers and updates the running
    averages as it does (not while initialising); evaluation uses `flax.linen.BatchNorm` itself.
    """

    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        # As Flax: statistics and normalisation in float32, the output in `dtype` (default: the
        # promoted type of the input and the parameters).
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, scale, bias)
        y, mean, var = batch_norm_train(x, scale.astype(jnp.float32), bias.astype(jnp.float32), self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(dtype)
