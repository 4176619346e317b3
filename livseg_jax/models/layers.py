"""The layers every block is built from, and the conv + BatchNorm (+ activation) unit.

`Layers` holds how layers compute (dtype, computation forms, training or deploy form); `build_model`
makes one and every block takes it as an attribute, so a new computation form is one change here,
not a flag threaded through every block (as Flax's examples pass `conv = partial(nn.Conv, ...)`).

`Layers.spatial_dims == 2` is the axial form (SPEC 1.5): a network folds the slice (depth) axis of
its (B, D, H, W, C) input into the batch (`fold`), and every layer it asks for drops the depth axis
of its 3D kernel, stride, padding or pooling window, so the same network code is a 2D network on
each axial slice, with 2D kernels (PyTorch's Conv2d layout) and no computation across slices.

Every unit has a training form and a deploy form (`deploy=True`) in which each BatchNorm is folded
into the convolution before it (see `livseg_jax.models.reparam`). Both forms use the same variable
names for the convolution, so a deploy tree is the training tree with BatchNorm entries removed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from livseg_jax.models import names
from livseg_jax.models.batch_norm import IMPLS as BATCH_NORM_IMPLS
from livseg_jax.models.batch_norm import TwoStageBatchNorm
from livseg_jax.models.depthwise import IMPLS as DEPTHWISE_IMPLS
from livseg_jax.models.depthwise import DepthwiseConv
from livseg_jax.models.packed_conv import PackedConv3d
from livseg_jax.models.params import BatchNorm, Conv, QuickParamCheck

Dtype = Any
Array = jax.Array

BN_MOMENTUM = 0.9  # Flax convention; PyTorch momentum 0.1
BN_EPSILON = 1e-5

# Kaiming-normal (fan-out, as torchvision and nnU-Net initialise convolutions).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Flax's default, used by the convolutions with a bias (MSCA's 1x1s, the heads).
default_init = nn.initializers.lecun_normal()


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


POINTWISE_IMPLS = ("conv", "einsum")


class PointwiseConv(QuickParamCheck, nn.Module):
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


@dataclasses.dataclass(frozen=True)
class Layers:
    """How the network's layers compute, decided once by `build_model`; blocks ask it for layers.

    The constructors below return modules with the same variables whatever the form, so the
    forms change speed, never the parameter tree. Frozen and made of values: hashable, and two
    equal configurations give equal models.
    """

    dtype: Dtype = jnp.float32  # compute dtype; parameters and BatchNorm statistics stay float32
    pointwise_impl: str = "conv"  # 1x1(x1) stride-1 convs: "conv" or "einsum" (matrix product)
    depthwise_impl: str = "conv"  # depthwise convs: "conv" (grouped), "shift" / "shift_stacked" (fused sums)
    dense_pack_channels: int = 0  # > 0: few-channel 3x3x3 convs on a width-packed view
    batch_norm_impl: str = "flax"  # training-mode BatchNorm: "flax" or "two_stage" (models/batch_norm.py)
    deploy: bool = False  # re-parameterised form: BatchNorms folded into the layer before them
    spatial_dims: int = 3  # 3: volumetric; 2: axial form (per-slice 2D layers, see the module doc)

    def __post_init__(self):
        if self.pointwise_impl not in POINTWISE_IMPLS:
            raise ValueError(f"pointwise_impl must be one of {POINTWISE_IMPLS}, got {self.pointwise_impl!r}")
        if self.depthwise_impl not in DEPTHWISE_IMPLS:
            raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {self.depthwise_impl!r}")
        if self.batch_norm_impl not in BATCH_NORM_IMPLS:
            raise ValueError(f"batch_norm_impl must be one of {BATCH_NORM_IMPLS}, got {self.batch_norm_impl!r}")
        pack = self.dense_pack_channels
        if not isinstance(pack, int) or isinstance(pack, bool) or pack < 0:
            raise ValueError(f"dense_pack_channels must be an integer >= 0 (0: off), got {pack!r}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 3 (volumetric) or 2 (axial slices), got {self.spatial_dims!r}")

    @property
    def axial(self) -> bool:
        """Returns whether layers are the axial (per-slice 2D) form."""
        return self.spatial_dims == 2

    def spatial(self, per_axis: Sequence | None) -> tuple | None:
        """Returns a (D, H, W) kernel, stride or padding as this form's per-axis setting: the axial
        form drops the depth entry; other lengths (a 2D kernel asked for explicitly) pass as given."""
        if per_axis is None or isinstance(per_axis, str):
            return per_axis
        per_axis = tuple(per_axis)
        return per_axis[1:] if self.axial and len(per_axis) == 3 else per_axis

    def fold(self, x: Array) -> Array:
        """Returns a (B, D, H, W, C) input in the network's layout: itself, or (B*D, H, W, C) axially."""
        return x.reshape((-1, *x.shape[2:])) if self.axial else x

    def unfold(self, y: Array, volume_shape: Sequence[int]) -> Array:
        """Returns a network-layout output (N, *S, K) as (B, D, H, W, K) for a (B, D, H, W) input."""
        return y.reshape((*volume_shape[:4], y.shape[-1])) if self.axial else y

    def network_size(self, volume_shape: Sequence[int]) -> tuple[int, ...]:
        """Returns the spatial size the network sees for a (B, D, H, W) input: (D, H, W) or (H, W)."""
        return tuple(volume_shape[2:4] if self.axial else volume_shape[1:4])

    def resize(self, x: Array, size: Sequence[int]) -> Array:
        """Returns channels-last `x` (N, *S, C) resized to spatial `size`: (bi/tri)linear with
        half-pixel centres, as PyTorch's `interpolate(..., align_corners=False)` up-sampling."""
        return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method="linear")

    def max_pool(self, x: Array, factor: int) -> Array:
        """Returns `x` max-pooled by `factor` along every axis the form pools (VALID windows)."""
        if factor == 1:
            return x
        window = (factor,) * (x.ndim - 2)
        return nn.max_pool(x, window, strides=window, padding="VALID")

    def conv(self, features: int, kernel_size: Sequence[int], *, name: str, use_bias: bool = True,
             strides: Sequence[int] | None = None, padding: str | Sequence[tuple[int, int]] = "SAME",
             kernel_init: Callable = default_init, dilation: int = 1) -> nn.Module:
        """Returns a convolution with `nn.Conv`'s variables, in the fastest form chosen for its shape.

        `PointwiseConv` for a stride-1 all-ones kernel when `pointwise_impl == "einsum"`;
        `PackedConv3d` for a stride-1 SAME undilated 3x3x3 kernel when `dense_pack_channels > 0`; else
        `nn.Conv` (`dilation`: its kernel dilation, every axis).
        """
        kernel_size, strides, padding = self.spatial(kernel_size), self.spatial(strides), self.spatial(padding)
        stride_one = all(s == 1 for s in (strides or ()))
        if self.pointwise_impl == "einsum" and stride_one and all(k == 1 for k in kernel_size):
            return PointwiseConv(features, len(kernel_size), use_bias, kernel_init, self.dtype, jnp.float32,
                                 name=name)
        if (self.dense_pack_channels > 0 and stride_one and dilation == 1 and tuple(kernel_size) == (3, 3, 3)
                and padding == "SAME"):
            return PackedConv3d(features, self.dense_pack_channels, use_bias, kernel_init, self.dtype,
                                jnp.float32, name=name)
        return Conv(features, tuple(kernel_size), strides=strides, padding=padding, use_bias=use_bias,
                    kernel_dilation=dilation, kernel_init=kernel_init, dtype=self.dtype,
                    param_dtype=jnp.float32, name=name)

    def depthwise(self, kernel_size: Sequence[int], *, name: str) -> nn.Module:
        """Returns a depthwise SAME convolution with bias (channels from its input)."""
        return DepthwiseConv(self.spatial(kernel_size), self.depthwise_impl, self.dtype, name=name)

    def batch_norm(self, train: bool, *, name: str) -> nn.Module:
        """Returns the project's BatchNorm (running averages in evaluation, float32 statistics);
        in training the `batch_norm_impl` form computes it (both forms have Flax's variables)."""
        if train and self.batch_norm_impl == "two_stage":
            return TwoStageBatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=name)
        return BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                         dtype=self.dtype, param_dtype=jnp.float32, name=name)

    def norm(self, train: bool, *, name: str) -> nn.Module:
        """Returns a BatchNorm with no conv before it; in deploy form its folded per-channel affine."""
        if self.deploy:
            return ChannelAffine(dtype=self.dtype, name=name)
        return self.batch_norm(train, name=name)

    def upsample(self, features: int, *, name: str) -> nn.Module:
        """Returns the learned 2x up-sampling to `features` channels (of every axis the form pools)."""
        return Upsample2x(features, ndim=self.spatial_dims, dtype=self.dtype, name=name)


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm [-> activation]; in deploy form one conv with bias.

    Input and output are channels-last, (B, D, H, W, C) for 3D kernels.
    """

    features: int
    kernel_size: Sequence[int] = (1, 1, 1)
    strides: Sequence[int] | None = None
    padding: str | Sequence[tuple[int, int]] = "SAME"
    act: Callable[[Array], Array] | None = None
    layers: Layers = Layers()
    dilation: int = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = self.layers.conv(self.features, self.kernel_size, strides=self.strides, padding=self.padding,
                             use_bias=self.layers.deploy, kernel_init=conv_init, dilation=self.dilation,
                             name=names.CONV)(x)
        if not self.layers.deploy:
            y = self.layers.batch_norm(train, name=names.BN)(y)
        return self.act(y) if self.act is not None else y


def upsample2x_reference(x: Array, kernel: Array, bias: Array) -> Array:
    """Returns `ConvTranspose{2,3}d(kernel_size=2, stride=2)` of (B, *S, I) as (B, *2S, O).

    `kernel` is (2,) * n + (I, O): output voxel (2d+i, 2h+j, 2w+k) takes x[d, h, w] @ kernel[i, j, k].
    With kernel == stride the windows do not overlap, so the transposed convolution is one matrix
    product per voxel followed by a reshape; this avoids `lax.conv_transpose`, whose strided 3D
    backward pass is very slow on GPUs (SPEC 5.1).
    """
    n = x.ndim - 2
    grid, offsets = "dhw"[-n:], "ijk"[-n:]
    interleaved = "".join(g + o for g, o in zip(grid, offsets, strict=True))
    y = jnp.einsum(f"b{grid}c,{offsets}co->b{interleaved}o", x, kernel)
    return y.reshape((x.shape[0], *(2 * size for size in x.shape[1:-1]), kernel.shape[-1])) + bias


class Upsample2x(QuickParamCheck, nn.Module):
    """Learned 2x up-sampling equal to PyTorch's `ConvTranspose{ndim}d(k=2, s=2)` with bias."""

    features: int
    ndim: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        # PyTorch's ConvTranspose3d initialises with fan computed from weight dim 1 (= out channels).
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2),
            (2,) * self.ndim + (in_features, self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return upsample2x_reference(x, kernel, bias)


class ChannelAffine(QuickParamCheck, nn.Module):
    """Per-channel `x * scale + bias`: the deploy form of a BatchNorm that has no conv before it."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return (x * scale.astype(self.dtype) + bias.astype(self.dtype)).astype(self.dtype)
