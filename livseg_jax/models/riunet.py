"""RIU-Net (SPEC 1.5): a U-Net whose blocks are residual Inception modules, in 3D.

Publication cited by the paper (Song, Wu & Wu, Sensors 2025) for RIU-Net: Lv, Wang and Wang
(2022), "2.5D lightweight RIU-Net for automatic liver and tumor segmentation from CT",
Biomedical Signal Processing and Control 75, 103567. What could be confirmed of it (abstract and
highlights): a U-Net framework whose convolution blocks are replaced by a lightweight
Inception (InceptionV3-style) structure with residual connections, trained in 2.5D on LiTS17 and
3DIRCADb with a BCE + Dice loss, about 70 % fewer parameters than U-Net. Its exact block layout,
widths and depth could not be read, so this module follows that description and chooses:

- U-Net skeleton as `UNet3D`'s: L = len(features) levels (widths from `model.features`, default
  five), 2x max pooling between encoder levels (U-Net's), a learned 2x up-sampling (`up<s>`, a
  ConvTranspose3d(2, 2)) to the skip's width, concatenation with the skip, then a block.
- Every block (`ResInceptionBlock`: `enc<s>`, `bottleneck`, `dec<s>`) is a residual Inception
  module with InceptionV3's factorisation: three parallel branches on the block input,
  `branch1` = 1x1x1, `branch3` = 1x1x1 reduce -> 3x3x3, `branch5` = 1x1x1 reduce -> 3x3x3 -> 3x3x3
  (a 5x5x5 receptive field from two 3x3x3, InceptionV3's replacement of 5x5), each conv a
  Conv-BN-ReLU with `features // 2` channels (BRANCH_RATIO); the branches are concatenated, fused
  by a 1x1x1 Conv-BN (`fuse`) to `features`, added to the shortcut (the input itself when widths
  agree, else a 1x1x1 Conv-BN `shortcut`, as ResNet's projection) and passed through ReLU.
  InceptionV3's pooling branch is left out (the lightweight design of the paper).
- 3D: 3x3x3 kernels and 2x2x2 pooling on every axis (the 2.5D input of the paper becomes a 3D
  patch); ReLU (not `model.activation`).
- Heads: the paper has no deep supervision; as our family with `deep_supervision=True`, one 1x1x1
  head per decoder level (`head0` coarse .. `head<L-2>` finest), resized to the input; evaluation
  and the deploy form keep the finest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from livseg_jax.models import names
from livseg_jax.models.layers import ConvBN, Layers, activation_fn
from livseg_jax.models.unet import SegmentationNetwork, deep_supervision_heads

Array = jax.Array

ACTIVATION = "relu"
BRANCH_RATIO = 2  # each branch conv has features // BRANCH_RATIO channels
# branch name -> kernel sizes of its Conv-BN-ReLU chain (1x1x1 reduction first, InceptionV3 style)
BRANCHES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "branch1": ((1, 1, 1),),
    "branch3": ((1, 1, 1), (3, 3, 3)),
    "branch5": ((1, 1, 1), (3, 3, 3), (3, 3, 3)),
}


class ConvChain(nn.Module):
    """Conv-BN-act units `conv0`, `conv1`, ... of the given kernel sizes, all `features` wide."""

    features: int
    kernels: Sequence[Sequence[int]]
    act: Callable[[Array], Array]
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i, kernel in enumerate(self.kernels):
            x = ConvBN(self.features, tuple(kernel), act=self.act, layers=self.layers, name=f"conv{i}")(x, train)
        return x


class ResInceptionBlock(nn.Module):
    """Residual Inception module: (B, D, H, W, C_in) -> (B, D, H, W, features) (see the module doc).

    The concatenated branches are sown as `intermediates/concat`.
    """

    features: int
    act: Callable[[Array], Array]
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        width = max(self.features // BRANCH_RATIO, 1)
        branches = [ConvChain(width, kernels, self.act, self.layers, name=name)(x, train)
                    for name, kernels in BRANCHES.items()]
        y = jnp.concatenate(branches, axis=-1)
        self.sow("intermediates", "concat", y)
        y = ConvBN(self.features, (1, 1, 1), layers=self.layers, name="fuse")(y, train)
        if x.shape[-1] == self.features:
            shortcut = x
        else:
            shortcut = ConvBN(self.features, (1, 1, 1), layers=self.layers, name="shortcut")(x, train)
        return self.act(y + shortcut)


class RIUNet(SegmentationNetwork):
    """RIU-Net on (B, D, H, W, C_in) -> logits (B, D, H, W, num_classes); heads as `UNet3D`'s."""

    activation: str = ACTIVATION

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | tuple[Array, ...]:
        x, out_shape = self.checked_input(x)
        levels = len(self.features)
        act = activation_fn(self.activation)

        skips = []
        for s in range(levels - 1):
            x = ResInceptionBlock(self.features[s], act, self.layers, name=f"enc{s}")(x, train)
            skips.append(x)
            x = self.layers.max_pool(x, 2)
        x = ResInceptionBlock(self.features[-1], act, self.layers, name="bottleneck")(x, train)

        decoded = []
        for s in reversed(range(levels - 1)):
            x = self.layers.upsample(self.features[s], name=f"{names.UP}{s}")(x)
            x = jnp.concatenate([x, skips[s]], axis=-1)
            x = ResInceptionBlock(self.features[s], act, self.layers, name=f"dec{s}")(x, train)
            decoded.append(x)  # coarse to fine

        return deep_supervision_heads(decoded, out_shape, self.num_classes, self.layers, train,
                                      self.deep_supervision)


def riunet_from_config(model_config: ml_collections.ConfigDict, layers: Layers) -> RIUNet:
    """Returns the `RIUNet` of a `model` section (widths from `features`, paper constants)."""
    return RIUNet(
        features=tuple(model_config.features),
        num_classes=model_config.num_classes,
        deep_supervision=model_config.deep_supervision,
        layers=layers,
    )
