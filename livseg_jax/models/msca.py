"""Multi-scale convolutional attention (MSCA) block, SPEC 1.4.

The paper runs MSCA on 3D feature maps by folding the slice axis into the batch and applying 2D
kernels to each axial slice ("3D-to-2D transformation"); `mode="3d"` instead uses 3D kernels with
strips along all three axes (an ablation). Inner layout follows SegNeXt's MSCAN block: attention
gate without sigmoid, GELU MLP with a depthwise 3x3 conv, learnable per-channel layer scales.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from livseg_jax.models.depthwise import DepthwiseConv
from livseg_jax.models.layers import Dtype, make_conv, norm_or_affine

Array = jax.Array

STRIP_SIZES = (7, 11, 21)
LAYER_SCALE_INIT = 1e-2


def _gelu(x: Array) -> Array:
    # Exact (erf) GELU, as PyTorch's nn.GELU default; Flax's default is the tanh approximation.
    return nn.gelu(x, approximate=False)


class _Convs:
    """Factory for the block's convolutions in 2D (slice trick) or 3D form."""

    def __init__(self, ndim: int, dtype: Dtype, depthwise_impl: str = "conv", pointwise_impl: str = "conv"):
        self.ndim = ndim
        self.dtype = dtype
        self.depthwise_impl = depthwise_impl
        self.pointwise_impl = pointwise_impl

    def pointwise(self, features: int, name: str) -> nn.Module:
        return make_conv(self.pointwise_impl, features, (1,) * self.ndim, None, True,
                         nn.initializers.lecun_normal(), self.dtype, name)

    def depthwise(self, channels: int, kernel: tuple[int, ...], name: str) -> nn.Module:
        del channels  # taken from the input
        return DepthwiseConv(kernel, self.depthwise_impl, self.dtype, name=name)

    def strips(self, size: int) -> list[tuple[int, ...]]:
        """Returns the strip kernels applied in sequence for one scale (last axis first)."""
        kernels = []
        for axis in reversed(range(self.ndim)):
            k = [1] * self.ndim
            k[axis] = size
            kernels.append(tuple(k))
        return kernels


class MSCAttention(nn.Module):
    """Multi-scale strip-convolution attention; a linear gate on its input, shape preserved."""

    ndim: int = 2
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "conv"
    pointwise_impl: str = "conv"

    @nn.compact
    def __call__(self, u: Array) -> Array:
        c = u.shape[-1]
        convs = _Convs(self.ndim, self.dtype, self.depthwise_impl, self.pointwise_impl)
        a = convs.depthwise(c, (5,) * self.ndim, "dw5")(u)
        s = 0
        for size in STRIP_SIZES:
            y = a
            for j, kernel in enumerate(convs.strips(size)):
                y = convs.depthwise(c, kernel, f"strip{size}_{j}")(y)
            s = s + y
        return convs.pointwise(c, "mix")(a + s) * u


class MSCABlock(nn.Module):
    """MSCA block on (B, D, H, W, C), shape preserved; `mode` is "2d" (per axial slice) or "3d"."""

    mode: str = "2d"
    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32
    deploy: bool = False
    depthwise_impl: str = "conv"  # "conv" (grouped convolution) or "shift" (fused shifted sums)
    pointwise_impl: str = "conv"  # "conv" or "einsum" (matrix product) for the 1x1 convolutions

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.mode not in ("2d", "3d"):
            raise ValueError(f"msca_mode must be '2d' or '3d', got {self.mode!r}")
        b, d, h, w, c = x.shape
        ndim = 2 if self.mode == "2d" else 3
        convs = _Convs(ndim, self.dtype, self.depthwise_impl, self.pointwise_impl)
        ls1 = self.param("layer_scale1", nn.initializers.constant(LAYER_SCALE_INIT), (c,))
        ls2 = self.param("layer_scale2", nn.initializers.constant(LAYER_SCALE_INIT), (c,))

        # BatchNorm statistics are per channel over (B, D, H, W), so normalising before the fold
        # to 2D is the same as after it.
        y = norm_or_affine(train, self.dtype, self.deploy, "norm1")(x)
        fold = (lambda t: t.reshape(b * d, h, w, t.shape[-1])) if ndim == 2 else (lambda t: t)
        unfold = (lambda t: t.reshape(b, d, h, w, t.shape[-1])) if ndim == 2 else (lambda t: t)

        y = fold(y)
        z = _gelu(convs.pointwise(c, "proj_in")(y))
        z = MSCAttention(ndim, self.dtype, self.depthwise_impl, self.pointwise_impl, name="attention")(z)
        z = convs.pointwise(c, "proj_out")(z) + y
        x = x + ls1.astype(x.dtype) * unfold(z)

        y = fold(norm_or_affine(train, self.dtype, self.deploy, "norm2")(x))
        hidden = self.mlp_ratio * c
        z = convs.pointwise(hidden, "fc1")(y)
        z = _gelu(convs.depthwise(hidden, (3,) * ndim, "dw3")(z))
        z = convs.pointwise(c, "fc2")(z)
        return x + ls2.astype(x.dtype) * unfold(z)
