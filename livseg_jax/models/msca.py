"""Multi-scale convolutional attention (MSCA) block, SPEC 1.4.

The paper runs MSCA on 3D feature maps by folding the slice axis into the batch and applying 2D
kernels to each axial slice ("3D-to-2D transformation"); `mode="3d"` instead uses 3D kernels with
strips along all three axes (an ablation). Inner layout follows SegNeXt's MSCAN block: attention
gate without sigmoid, GELU MLP with a depthwise 3x3 conv, learnable per-channel layer scales.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from livseg_jax.models import names
from livseg_jax.models.layers import Layers
from livseg_jax.models.params import QuickParamCheck

Array = jax.Array

STRIP_SIZES = (7, 11, 21)
LAYER_SCALE_INIT = 1e-2


def _gelu(x: Array) -> Array:
    # Exact (erf) GELU, as PyTorch's nn.GELU default; Flax's default is the tanh approximation.
    return nn.gelu(x, approximate=False)


def strip_kernels(size: int, ndim: int) -> list[tuple[int, ...]]:
    """Returns the strip kernels applied in sequence for one scale (last axis first)."""
    kernels = []
    for axis in reversed(range(ndim)):
        k = [1] * ndim
        k[axis] = size
        kernels.append(tuple(k))
    return kernels


class MSCAttention(nn.Module):
    """Multi-scale strip-convolution attention; a linear gate on its input, shape preserved."""

    ndim: int = 2
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, u: Array) -> Array:
        c = u.shape[-1]
        a = self.layers.depthwise((5,) * self.ndim, name="dw5")(u)
        s = 0
        for size in STRIP_SIZES:
            y = a
            for j, kernel in enumerate(strip_kernels(size, self.ndim)):
                y = self.layers.depthwise(kernel, name=f"strip{size}_{j}")(y)
            s = s + y
        return self.layers.conv(c, (1,) * self.ndim, name="mix")(a + s) * u


class MSCABlock(QuickParamCheck, nn.Module):
    """MSCA block on (B, D, H, W, C) (or axial (B*D, H, W, C)), shape preserved; `mode` is "2d"
    (per axial slice) or "3d"."""

    mode: str = "2d"
    mlp_ratio: int = 4
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.mode not in ("2d", "3d"):
            raise ValueError(f"msca_mode must be '2d' or '3d', got {self.mode!r}")
        if x.ndim == 4 and self.mode == "3d":
            raise ValueError("msca_mode='3d' needs a volumetric network (model.spatial_dims=3); "
                             "the axial form runs MSCA on slices ('2d')")
        c = x.shape[-1]
        ndim = 2 if self.mode == "2d" else 3
        pointwise = (1,) * ndim
        ls1 = self.param("layer_scale1", nn.initializers.constant(LAYER_SCALE_INIT), (c,))
        ls2 = self.param("layer_scale2", nn.initializers.constant(LAYER_SCALE_INIT), (c,))
        norm1, norm2 = names.MSCA_NORMS

        # BatchNorm statistics are per channel over (B, D, H, W), so normalising before the fold
        # to 2D is the same as after it.
        y = self.layers.norm(train, name=norm1)(x)
        # A volume (B, D, H, W, C) in "2d" mode runs on its slices; the axial form is already 2D.
        folds = x.ndim == 5 and ndim == 2
        fold = (lambda t: t.reshape(-1, *t.shape[2:])) if folds else (lambda t: t)
        unfold = (lambda t: t.reshape(x.shape[:-1] + t.shape[-1:])) if folds else (lambda t: t)

        y = fold(y)
        z = _gelu(self.layers.conv(c, pointwise, name="proj_in")(y))
        z = MSCAttention(ndim, self.layers, name="attention")(z)
        z = self.layers.conv(c, pointwise, name="proj_out")(z) + y
        x = x + ls1.astype(x.dtype) * unfold(z)

        y = fold(self.layers.norm(train, name=norm2)(x))
        hidden = self.mlp_ratio * c
        z = self.layers.conv(hidden, pointwise, name="fc1")(y)
        z = _gelu(self.layers.depthwise((3,) * ndim, name="dw3")(z))
        z = self.layers.conv(c, pointwise, name="fc2")(z)
        return x + ls2.astype(x.dtype) * unfold(z)
