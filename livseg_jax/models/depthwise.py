"""Depthwise convolution with two interchangeable implementations.

`impl="conv"` is `lax.conv_general_dilated` with one group per channel (cuDNN on GPUs).
`impl="shift"` writes the same convolution as a sum of shifted, per-channel-scaled copies of the
zero-padded input. XLA fuses that sum (and its transpose in the backward pass) into one
memory-bound loop that reads the input once, which on GPUs beats grouped convolutions for the
few-channel 3D maps and long strip kernels of MSCA. Both use the same parameters
(`kernel` (*k, 1, C), `bias` (C,)), so checkpoints and converted weights work with either.

The shift form has its own backward pass (`depthwise_shift` is a `jax.custom_vjp`): left to
autodiff, the kernel gradient becomes one fused reduction per tap over every voxel down to C
values, which XLA runs on a handful of thread blocks: on an H100 two such fusions of MSCA's
16x16-voxel bottleneck took 5.6 ms of a 69 ms step (`experiments/profile_train_step.py`). Here the
sum runs in two stages, first along the last spatial axis only (many independent sums), then
over the rest.

In training, each shifted sum (the output, and the input gradient) is kept out of XLA's reduction
kernels by optimisation barriers. Left alone, XLA fused these k-tap sums into neighbouring
reductions: the kernel gradient's sums reading the same cotangent, the previous layer's bias
gradient reading the input gradient, backward reductions recomputing the forward output instead of
reading it. Every tap then ran inside a reduction kernel: on an H200 one such fusion of a 21-tap
strip on MSCA's 32-channel half-resolution maps took 0.8 ms, against about 0.03 ms for reading and
writing those maps once. The barriers took that MSCA block from 7.5 to 5.9 ms of the bf16 step on
an H200 (docs/benchmarks.md, session 10). A barrier costs at most one write and read of the map it
holds.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from livseg_jax.models.params import QuickParamCheck

Array = jax.Array
Dtype = Any
IMPLS = ("conv", "shift", "shift_stacked")


def _check_odd(spatial: Sequence[int]) -> None:
    if any(k % 2 == 0 for k in spatial):
        raise ValueError(f"depthwise_shift needs odd kernel sizes, got {tuple(spatial)}")


def _windows(x: Array, spatial: Sequence[int]):
    """Yields (tap, window): the float32 zero-padded input seen through each kernel tap."""
    pads = [(0, 0)] + [(k // 2, k // 2) for k in spatial] + [(0, 0)]
    xp = jnp.pad(x.astype(jnp.float32), pads)
    sizes = x.shape[1:-1]
    for offset in itertools.product(*[range(k) for k in spatial]):
        yield offset, xp[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, sizes, strict=True))]


def depthwise_shift_reference(x: Array, kernel: Array) -> Array:
    """The shifted-sum depthwise convolution, differentiated by autodiff (the reference)."""
    _check_odd(kernel.shape[:-2])
    w = kernel[..., 0, :].astype(jnp.float32)
    out = None
    for offset, window in _windows(x, kernel.shape[:-2]):
        term = window * w[offset]
        out = term if out is None else out + term
    return out.astype(x.dtype)


def _stacked_sum(x: Array, kernel: Array) -> Array:
    """The same sum written with the taps stacked: one slice per tap, then one multiply and one sum.

    The loop form traces six operations per tap (the window, the tap's weight, its squeeze and
    broadcast, the multiply, the add); MSCA's four blocks have ~1,100 taps. Stacked, the paper
    step's gradient program traces 12,674 operations instead of 16,834 and compiled about 3 s
    faster on an H200, but its step ran about 20% slower (docs/benchmarks.md, session 12): an
    option (`depthwise_impl="shift_stacked"`), not the GPU default.
    """
    _check_odd(kernel.shape[:-2])
    windows = [window for _, window in _windows(x, kernel.shape[:-2])]
    taps = jax.lax.concatenate(windows, 0).reshape(len(windows), *x.shape)
    w = kernel.astype(jnp.float32).reshape(len(windows), *(1,) * (x.ndim - 1), x.shape[-1])
    return jnp.sum(taps * w, axis=0).astype(x.dtype)


def _shifted_sum(x: Array, kernel: Array, stacked: bool) -> Array:
    return _stacked_sum(x, kernel) if stacked else depthwise_shift_reference(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shift(x: Array, kernel: Array, stacked: bool = False) -> Array:
    """Returns the 'SAME'-padded depthwise convolution of (N, *S, C) with kernel (*k, 1, C), odd k.

    Accumulates in float32 whatever the input dtype, and returns the input dtype. `stacked` writes
    the taps' sum as one stacked reduction (`_stacked_sum`), the same arithmetic up to its order.
    """
    return _shifted_sum(x, kernel, stacked)


def _depthwise_shift_forward(x: Array, kernel: Array, stacked: bool):
    # The barrier (module doc): backward reductions read the output rather than recompute its taps.
    return jax.lax.optimization_barrier(_shifted_sum(x, kernel, stacked)), (x, kernel)


def _depthwise_shift_backward(stacked: bool, residuals, grad: Array):
    x, kernel = residuals
    spatial = kernel.shape[:-2]
    # A 'SAME' correlation with an odd kernel is transposed by the same correlation with the
    # kernel flipped along every spatial axis.
    flipped = kernel[tuple(slice(None, None, -1) for _ in spatial)]
    # Barriers (module doc): the shifted sum gets a kernel of its own, elementwise.
    grad_x = _shifted_sum(jax.lax.optimization_barrier(grad), flipped, stacked).astype(x.dtype)
    grad_x = jax.lax.optimization_barrier(grad_x)
    g = grad.astype(jnp.float32)
    last_spatial = x.ndim - 2
    partial = jnp.stack([jnp.sum(window * g, axis=last_spatial) for _, window in _windows(x, spatial)])
    grad_kernel = jnp.sum(partial, axis=tuple(range(1, partial.ndim - 1)))
    return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


depthwise_shift.defvjp(_depthwise_shift_forward, _depthwise_shift_backward)


class DepthwiseConv(QuickParamCheck, nn.Module):
    """Depthwise 'SAME' convolution with bias on (N, *S, C); `impl` chooses the computation."""

    kernel_size: Sequence[int]
    impl: str = "conv"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.impl not in IMPLS:
            raise ValueError(f"depthwise impl must be one of {IMPLS}, got {self.impl!r}")
        c = x.shape[-1]
        kernel_size = tuple(self.kernel_size)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*kernel_size, 1, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.impl in ("shift", "shift_stacked"):
            y = depthwise_shift(x, kernel, self.impl == "shift_stacked")
        else:
            nd = len(kernel_size)
            y = jax.lax.conv_general_dilated(
                x, kernel, (1,) * nd, "SAME", feature_group_count=c,
                dimension_numbers=nn.linear._conv_dimension_numbers(x.shape))
        return y + bias
