"""Depthwise convolution with two interchangeable implementations.

`impl="conv"` is `lax.conv_general_dilated` with one group per channel (cuDNN on GPUs).
`impl="shift"` writes the same convolution as a sum of shifted, per-channel-scaled copies of the
zero-padded input. XLA fuses that sum (and its transpose in the backward pass) into one
memory-bound loop that reads the input once, which on GPUs beats grouped convolutions for the
few-channel 3D maps and long strip kernels of MSCA. Both use the same parameters
(`kernel` (*k, 1, C), `bias` (C,)), so checkpoints and converted weights work with either.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from livseg_jax.models.layers import Dtype

Array = jax.Array
IMPLS = ("conv", "shift")


def depthwise_shift(x: Array, kernel: Array) -> Array:
    """Returns the 'SAME'-padded depthwise convolution of (N, *S, C) with kernel (*k, 1, C), odd k.

    Accumulates in float32 whatever the input dtype, and returns the input dtype.
    """
    spatial = kernel.shape[:-2]
    if any(k % 2 == 0 for k in spatial):
        raise ValueError(f"depthwise_shift needs odd kernel sizes, got {spatial}")
    pads = [(0, 0)] + [(k // 2, k // 2) for k in spatial] + [(0, 0)]
    xp = jnp.pad(x.astype(jnp.float32), pads)
    w = kernel[..., 0, :].astype(jnp.float32)
    out = None
    sizes = x.shape[1:-1]
    for offset in itertools.product(*[range(k) for k in spatial]):
        window = xp[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, sizes, strict=True))]
        term = window * w[offset]
        out = term if out is None else out + term
    return out.astype(x.dtype)


class DepthwiseConv(nn.Module):
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
        if self.impl == "shift":
            y = depthwise_shift(x, kernel)
        else:
            nd = len(kernel_size)
            y = jax.lax.conv_general_dilated(
                x, kernel, (1,) * nd, "SAME", feature_group_count=c,
                dimension_numbers=nn.linear._conv_dimension_numbers(x.shape))
        return y + bias
