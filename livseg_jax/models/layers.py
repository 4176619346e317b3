"""Building blocks shared by every variant: conv + BatchNorm (+ activation) units and the learned
2x up-sampling.

Every unit has a training form and a deploy form (`deploy=True`) in which each BatchNorm is folded
into the convolution before it (see `livseg_jax.models.reparam`). Both forms use the same variable
names for the convolution, so a deploy tree is the training tree with BatchNorm entries removed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from livseg_jax.models.packed_conv import PackedConv3d

Dtype = Any
Array = jax.Array

BN_MOMENTUM = 0.9  # Flax convention; PyTorch momentum 0.1
BN_EPSILON = 1e-5

# Kaiming-normal (fan-out, as torchvision and nnU-Net initialise convolutions).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def activation_fn(name: str) -> Callable[[Array], Array]:
    """Returns the activation function called `name`."""
    table = {
        "relu": nn.relu,
        "silu": nn.silu,
        "gelu": lambda x: nn.gelu(x, approximate=False),
        "leaky_relu": lambda x: nn.leaky_relu(x, 0.01),
        "elu": nn.elu,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]


def batch_norm(train: bool, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
    """Returns the project's BatchNorm (running averages in evaluation, float32 statistics)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


POINTWISE_IMPLS = ("conv", "einsum")


class PointwiseConv(nn.Module):
    """A 1x1 (or 1x1x1) convolution computed as a matrix product over the channel axis.

    Same parameters as the `nn.Conv` it replaces (`kernel` of shape (1,)*ndim + (C_in, C_out),
    optional `bias`) and the same initialisation, so checkpoints, re-parameterisation and the
    PyTorch mapping do not see the difference; XLA lowers it to a GEMM instead of a convolution.
    """

    features: int
    ndim: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (1,) * self.ndim + (c, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.einsum("...c,co->...o", x, kernel.reshape(c, self.features))
        return y + bias if bias is not None else y


def make_conv(impl: str, features: int, kernel_size: Sequence[int], strides: Sequence[int] | None,
              use_bias: bool, kernel_init: Callable, dtype: Dtype, name: str,
              padding: str = "SAME", dense_pack_channels: int = 0) -> nn.Module:
    """Returns the convolution module for a kernel shape, all with `nn.Conv`'s variables.

    `PointwiseConv` for a stride-1 all-ones kernel when `impl == "einsum"`; `PackedConv3d` for a
    stride-1 SAME 3x3x3 kernel when `dense_pack_channels > 0`; else `nn.Conv`.
    """
    if impl not in POINTWISE_IMPLS:
        raise ValueError(f"pointwise_impl must be one of {POINTWISE_IMPLS}, got {impl!r}")
    stride_one = all(s == 1 for s in (strides or ()))
    if impl == "einsum" and stride_one and all(k == 1 for k in kernel_size):
        return PointwiseConv(features, len(kernel_size), use_bias, kernel_init, dtype, jnp.float32, name=name)
    if dense_pack_channels > 0 and stride_one and tuple(kernel_size) == (3, 3, 3) and padding == "SAME":
        return PackedConv3d(features, dense_pack_channels, use_bias, kernel_init, dtype, jnp.float32, name=name)
    return nn.Conv(features, tuple(kernel_size), strides=strides, padding=padding, use_bias=use_bias,
                   kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32, name=name)


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm [-> activation]; in deploy form one conv with bias.

    Input and output are channels-last, (B, D, H, W, C) for 3D kernels.
    """

    features: int
    kernel_size: Sequence[int] = (1, 1, 1)
    strides: Sequence[int] | None = None
    padding: str = "SAME"
    act: Callable[[Array], Array] | None = None
    dtype: Dtype = jnp.float32
    deploy: bool = False
    pointwise_impl: str = "conv"  # "einsum": 1x1x1 stride-1 kernels as a matrix product
    dense_pack_channels: int = 0  # > 0: few-channel 3x3x3 kernels on a width-packed view

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = make_conv(self.pointwise_impl, self.features, self.kernel_size, self.strides, self.deploy,
                      conv_init, self.dtype, "conv", self.padding, self.dense_pack_channels)(x)
        if not self.deploy:
            y = batch_norm(train, self.dtype, name="bn")(y)
        return self.act(y) if self.act is not None else y


def upsample2x_reference(x: Array, kernel: Array, bias: Array) -> Array:
    """Returns `ConvTranspose3d(kernel_size=2, stride=2)` of (B, D, H, W, I) as (B, 2D, 2H, 2W, O).

    `kernel` is (2, 2, 2, I, O): output voxel (2d+i, 2h+j, 2w+k) takes x[d, h, w] @ kernel[i, j, k].
    With kernel == stride the windows do not overlap, so the transposed convolution is one matrix
    product per voxel followed by a reshape; this avoids `lax.conv_transpose`, whose strided 3D
    backward pass is very slow on GPUs (SPEC 5.1).
    """
    b, d, h, w, _ = x.shape
    out = kernel.shape[-1]
    y = jnp.einsum("bdhwc,ijkco->bdihjwko", x, kernel)
    return y.reshape(b, 2 * d, 2 * h, 2 * w, out) + bias


class Upsample2x(nn.Module):
    """Learned 2x up-sampling equal to PyTorch's `ConvTranspose3d(k=2, s=2)` with bias."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        # PyTorch's ConvTranspose3d initialises with fan computed from weight dim 1 (= out channels).
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2),
            (2, 2, 2, in_features, self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return upsample2x_reference(x, kernel, bias)


class ChannelAffine(nn.Module):
    """Per-channel `x * scale + bias`: the deploy form of a BatchNorm that has no conv before it."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return (x * scale.astype(self.dtype) + bias.astype(self.dtype)).astype(self.dtype)


def norm_or_affine(train: bool, dtype: Dtype, deploy: bool, name: str) -> Callable[[Array], Array]:
    """Returns a BatchNorm in training form, or its folded per-channel affine in deploy form."""
    if deploy:
        return ChannelAffine(dtype=dtype, name=name)
    return batch_norm(train, dtype, name=name)
