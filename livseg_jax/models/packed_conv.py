"""Few-channel 3x3x3 convolutions computed on a width-packed view of the volume.

cuDNN's implicit-GEMM kernels run far below the GPU's bandwidth when a 3D convolution has only
8-16 channels (the full-resolution RepConv3d layers of the ELANRes variants spend ~9 ms per layer
per step on an H100, most of it in the weight gradient; `experiments/profile_train_step.py`).
A channels-last volume (B, D, H, W, C) is, without moving a byte, also a volume
(B, D, H, W/f, f*C): f neighbouring voxels along W side by side as channels. A stride-1 3x3x3
convolution of the original equals a stride-1 3x3x3 convolution of the packed view whose
(f*C_in, f*C_out) kernel is assembled from the original (C_in, C_out) taps, because output voxel
f*w + a reads input voxels f*w + a - 1 .. f*w + a + 1, all within packed positions w - 1 .. w + 1.
The packed kernel is mostly zeros (f times the FLOPs), which costs nothing on a step that is
75x under the arithmetic bound, and cuDNN runs its wide-channel kernels. Zero padding of one
packed position supplies the one zero voxel each border needs. Gradients flow back through the
kernel's assembly to the original taps, so parameters, checkpoints and the PyTorch mapping are
those of `nn.Conv`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from livseg_jax.models.params import QuickParamCheck

Array = jax.Array


def packing_factor(width: int, c_in: int, c_out: int, target_channels: int) -> int:
    """The largest power of two f with f * max(c_in, c_out) <= target_channels that divides `width`.

    1 (no packing) when `target_channels` is 0 or the channels already reach it."""
    if target_channels <= 0:
        return 1
    f = 1
    while 2 * f * max(c_in, c_out) <= target_channels and width % (2 * f) == 0:
        f *= 2
    return f


def tap_selection(factor: int) -> np.ndarray:
    """(3, f, f, 3) 0/1 array: [t, s, a, k] = 1 when packed tap t carries the original W tap k
    from input sub-position s to output sub-position a."""
    select = np.zeros((3, factor, factor, 3), np.float32)
    for t in range(3):
        for s in range(factor):
            for a in range(factor):
                k = factor * (t - 1) + s - a + 1  # original tap index along W
                if 0 <= k <= 2:
                    select[t, s, a, k] = 1.0
    return select


def pack_kernel(kernel: Array, factor: int) -> Array:
    """(3, 3, 3, I, O) kernel -> (3, 3, 3, f*I, f*O) kernel of the width-packed convolution."""
    if factor == 1:
        return kernel
    kd, kh, kw, c_in, c_out = kernel.shape
    if (kd, kh, kw) != (3, 3, 3):
        raise ValueError(f"width packing needs a 3x3x3 kernel, got {kernel.shape}")
    select = jnp.asarray(tap_selection(factor), kernel.dtype)
    packed = jnp.einsum("tsak,dhkio->dhtsiao", select, kernel)
    return packed.reshape(3, 3, 3, factor * c_in, factor * c_out)


def packed_conv3d(x: Array, kernel: Array, factor: int) -> Array:
    """SAME, stride-1 3x3x3 convolution of channels-last `x` (B, D, H, W, I) with `kernel`
    (3, 3, 3, I, O), computed on the width-packed view; `factor` must divide W."""
    b, d, h, w, c_in = x.shape
    c_out = kernel.shape[-1]
    if w % factor:
        raise ValueError(f"packing factor {factor} does not divide the width {w}")
    y = jax.lax.conv_general_dilated(
        x.reshape(b, d, h, w // factor, factor * c_in),
        pack_kernel(kernel, factor),
        window_strides=(1, 1, 1),
        padding=((1, 1), (1, 1), (1, 1)),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
    )
    return y.reshape(b, d, h, w, c_out)


class PackedConv3d(QuickParamCheck, nn.Module):
    """Drop-in for `nn.Conv(features, (3, 3, 3), padding="SAME")`: same variables (`kernel`,
    optional `bias`), same initialisation, computed by `packed_conv3d` when packing pays."""

    features: int
    target_channels: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (3, 3, 3, c_in, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        factor = packing_factor(x.shape[3], c_in, self.features, self.target_channels)
        y = packed_conv3d(x, kernel, factor)
        return y + bias if bias is not None else y
