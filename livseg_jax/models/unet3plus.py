"""UNet 3+ (SPEC 1.5): full-scale skip connections and full-scale deep supervision, in 3D.

Follows Huang, Lin, Tong, Hu, Zhang, Iwamoto, Han, Chen and Wu (2020), "UNet 3+: A Full-Scale
Connected UNet for Medical Image Segmentation" (ICASSP 2020). Layout, with L = len(features)
levels (the paper: five, widths 64, 128, 256, 512, 1024):

- Encoder: at every level two Conv3x3x3-BN-ReLU (`DoubleConv`, as the paper's U-Net encoder),
  2x max pooling between levels (the paper's down-sampling; parameter-free); the last level is
  the bottleneck (the paper's X_En^5, which is also its X_De^5).
- Decoder level i (i = L-2 .. 0, coarse to fine) receives all L scales: the finer encoder maps
  X_En^j (j < i) max-pooled by 2^(i-j), the same-scale encoder map X_En^i, and the coarser
  decoder maps X_De^j (j > i; the bottleneck for j = L-1) up-sampled by 2^(j-i). Each of the L
  inputs goes through its own 3x3x3 Conv-BN-ReLU to `cat_channels` (the paper's 64) channels
  (`dec<i>/scale<j>`, j the source level); the L maps are concatenated (L x 64 = 320 channels in
  the paper) and fused by a 3x3x3 Conv-BN-ReLU to the same width (`dec<i>/fuse`).
- Full-scale deep supervision: as the paper, a head on the bottleneck and on every decoder level,
  each a plain 3x3x3 convolution with bias resized to the input (trilinear), so L heads named
  `head0` (bottleneck) .. `head<L-1>` (finest decoder level), coarse to fine. The sigmoid of the
  paper is the loss's business here (logits out); evaluation returns the finest head alone.

Choices of the 3D version: 3x3 kernels became 3x3x3 and 2x2 pools 2x2x2; the paper's bilinear
up-sampling became trilinear with half-pixel centres (PyTorch `align_corners=False`, the
official code's default), parameter-free; max pooling by 2^k uses a 2^k window and stride (the
official code's `MaxPool2d(k, k, ceil_mode=True)`; patches divide by 2^(L-1), so no ceiling
applies). The classification-guided module (CGM) and the hybrid focal + MS-SSIM + IoU loss of
the paper are not implemented: the network is trained with the project's losses. ReLU as the
paper (not `model.activation`); widths from `model.features` (the paper's 64 .. 1024 are not the
project default); `cat_channels` (default 64) from `model.cat_channels` when that key exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from livseg_jax.models import names
from livseg_jax.models.elanres import DoubleConv
from livseg_jax.models.layers import ConvBN, Layers, activation_fn
from livseg_jax.models.unet import SegmentationNetwork, network_output

Array = jax.Array

CAT_CHANNELS = 64  # the paper's per-scale width in the decoder ("5 x 64")
ACTIVATION = "relu"  # the paper's
HEAD_KERNEL = (3, 3, 3)  # the paper's deep-supervision heads are plain 3x3 convolutions


def max_pool(x: Array, factor: int) -> Array:
    """Returns the non-overlapping max pooling by `factor` of every spatial axis of (B, *S, C)
    (identity for 1): (B, D, H, W, C) in 3D, (B*D, H, W, C) in the axial form."""
    if factor == 1:
        return x
    window = (factor,) * (x.ndim - 2)
    return nn.max_pool(x, window, strides=window, padding="VALID")


def upsample(x: Array, factor: int) -> Array:
    """Returns the (bi/tri)linear (half-pixel centres) up-sampling of (B, *S, C) by `factor`."""
    if factor == 1:
        return x
    return jax.image.resize(x, (x.shape[0], *(n * factor for n in x.shape[1:-1]), x.shape[-1]), method="linear")


class FullScaleDecoderLevel(nn.Module):
    """One UNet 3+ decoder level: L resampled scales, each to `cat_channels`, concatenated, fused.

    `sources[j]` is the map of level j (encoder for j <= level, decoder or bottleneck above);
    level j is max-pooled (j < level) or up-sampled (j > level) to this level's size. The
    concatenated input (L x cat_channels channels) is sown as `intermediates/fused_input`.
    """

    level: int
    cat_channels: int = CAT_CHANNELS
    activation: str = ACTIVATION
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, sources: Sequence[Array], train: bool) -> Array:
        act = activation_fn(self.activation)
        parts = []
        for j, src in enumerate(sources):
            if j < self.level:
                src = max_pool(src, 2 ** (self.level - j))
            elif j > self.level:
                src = upsample(src, 2 ** (j - self.level))
            parts.append(ConvBN(self.cat_channels, (3, 3, 3), act=act, layers=self.layers,
                                name=f"scale{j}")(src, train))
        x = jnp.concatenate(parts, axis=-1)
        self.sow("intermediates", "fused_input", x)
        return ConvBN(self.cat_channels * len(sources), (3, 3, 3), act=act, layers=self.layers,
                      name="fuse")(x, train)


class UNet3Plus(SegmentationNetwork):
    """UNet 3+ on (B, D, H, W, C_in) -> logits (B, D, H, W, num_classes) (see the module doc).

    Training returns the L heads (bottleneck, then decoder levels coarse to fine) at the input
    size, or the finest alone with `deep_supervision=False`; evaluation returns the finest map.
    """

    features: Sequence[int] = (64, 128, 256, 512, 1024)
    cat_channels: int = CAT_CHANNELS
    activation: str = ACTIVATION

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | tuple[Array, ...]:
        x, out_shape = self.checked_input(x)
        levels = len(self.features)
        act = activation_fn(self.activation)

        encoded = []
        for s in range(levels):
            if s > 0:
                x = max_pool(x, 2)
            name = "bottleneck" if s == levels - 1 else f"enc{s}"
            x = DoubleConv(self.features[s], act, self.layers, name=name)(x, train)
            encoded.append(x)

        # sources[j]: encoder maps for j <= i, decoder maps (bottleneck at L-1) above.
        decoded = {levels - 1: encoded[-1]}
        for i in reversed(range(levels - 1)):
            sources = encoded[: i + 1] + [decoded[j] for j in range(i + 1, levels)]
            decoded[i] = FullScaleDecoderLevel(i, self.cat_channels, self.activation, self.layers,
                                               name=f"dec{i}")(sources, train)
        stages = [decoded[j] for j in reversed(range(levels))]  # coarse to fine, bottleneck first

        n = len(stages)
        supervised = range(n) if (train and self.deep_supervision) else [n - 1]
        heads = [self.layers.conv(self.num_classes, HEAD_KERNEL, name=f"{names.HEAD}{i}")(stages[i])
                 for i in supervised]
        return network_output(heads, out_shape, self.layers, train)


def unet3plus_from_config(model_config: ml_collections.ConfigDict, layers: Layers) -> UNet3Plus:
    """Returns the `UNet3Plus` of a `model` section (widths from `features`, paper constants)."""
    return UNet3Plus(
        features=tuple(model_config.features),
        num_classes=model_config.num_classes,
        cat_channels=model_config.get("cat_channels", CAT_CHANNELS),
        deep_supervision=model_config.deep_supervision,
        layers=layers,
    )
