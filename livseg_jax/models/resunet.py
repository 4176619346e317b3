"""Plain residual 3D U-Net (SPEC 1.5; the LiTS thesis's ResUNet).

Follows Zhang, Liu & Wang (2018), "Road Extraction by Deep Residual U-Net" (IEEE Geoscience and
Remote Sensing Letters 15(5)), made 3D:

- every unit is a pre-activation residual unit (He et al. 2016): BN-ReLU-Conv3x3x3-BN-ReLU-
  Conv3x3x3 plus a shortcut; the first unit of the encoder has no pre-activation
  (Conv-BN-ReLU-Conv plus shortcut), as the paper's level 1;
- down-sampling is the stride 2 of the first convolution of the unit at every level beyond the
  first (no pooling); the bridge is such a unit too;
- decoder: per level 2x up-sampling, concatenation with the encoder unit of the same level, one
  residual unit (stride 1); a 1x1x1 head per level.

Choices a 3D version had to make (the paper fixes 2D, widths (64, 128, 256, 512), 3 encoder
levels + bridge, a sigmoid output):
- widths and depth come from `model.features` (one per level, the last is the bridge;
  `PAPER_FEATURES` are the paper's);
- the shortcut is a 1x1x1 Conv-BN with the unit's stride (the paper draws the identity; the
  channel count and grid change at every unit, so a projection is needed, as its implementations do);
- the stride-2 3x3x3 convolution pads one voxel on each side (PyTorch's `padding=1`), the
  1x1x1 stride-2 shortcut none: both pick the even voxels;
- the second convolution of a unit has a bias and no BatchNorm after it (the sum with the
  shortcut follows; the next unit's pre-activation normalises);
- up-sampling is our learned 2x (`up<s>`, ConvTranspose3d k=2 s=2, to the level's width)
  instead of the paper's fixed 2x up-sampling;
- the paper has no deep supervision: with `deep_supervision=True` each decoder level gets a
  1x1x1 head `head<i>` (coarse to fine, resized to the input) as in our family; else one head;
  softmax logits over `num_classes` instead of the sigmoid output.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from livseg_jax.models import names
from livseg_jax.models.layers import ConvBN, Layers, activation_fn, conv_init
from livseg_jax.models.unet import SegmentationNetwork, deep_supervision_heads

Array = jax.Array

ACTIVATION = "relu"  # the paper's
PAPER_FEATURES = (64, 128, 256, 512)  # 3 encoder levels + bridge


def strided_padding(stride: int) -> str | tuple[tuple[int, int], ...]:
    """Returns the padding of a 3x3x3 conv with `stride`: SAME, or one voxel each side (PyTorch's)."""
    return "SAME" if stride == 1 else ((1, 1),) * 3


class ResidualUnit(nn.Module):
    """[BN-act-]Conv3x3x3(stride)-BN-act-Conv3x3x3 + Conv1x1x1(stride)-BN: (B,D,H,W,C) -> features."""

    features: int
    act: Callable[[Array], Array]
    stride: int = 1
    preact: bool = True
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        strides = (self.stride,) * 3
        h = self.act(self.layers.norm(train, name=names.PREACT)(x)) if self.preact else x
        h = ConvBN(self.features, (3, 3, 3), strides=strides, padding=strided_padding(self.stride),
                   act=self.act, layers=self.layers, name="conv1")(h, train)
        h = self.layers.conv(self.features, (3, 3, 3), kernel_init=conv_init, name="conv2")(h)
        shortcut = ConvBN(self.features, (1, 1, 1), strides=strides, layers=self.layers, name="shortcut")(x, train)
        return h + shortcut


class ResUNet3D(SegmentationNetwork):
    """Residual U-Net on (B, D, H, W, C_in) returning logits (B, D, H, W, num_classes).

    Training returns the per-decoder-level logits coarse to fine at the input size (one with
    `deep_supervision=False`); evaluation returns the finest map alone.
    """

    activation: str = ACTIVATION

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | tuple[Array, ...]:
        x, out_shape = self.checked_input(x)
        levels = len(self.features)
        act = activation_fn(self.activation)

        skips = []
        for s in range(levels - 1):
            x = ResidualUnit(self.features[s], act, stride=1 if s == 0 else 2, preact=s > 0, layers=self.layers,
                             name=f"enc{s}")(x, train)
            skips.append(x)
        x = ResidualUnit(self.features[-1], act, stride=2, layers=self.layers, name="bottleneck")(x, train)

        decoded = []
        for s in reversed(range(levels - 1)):
            x = self.layers.upsample(self.features[s], name=f"{names.UP}{s}")(x)
            x = ResidualUnit(self.features[s], act, layers=self.layers, name=f"dec{s}")(
                jnp.concatenate([x, skips[s]], axis=-1), train)
            decoded.append(x)  # coarse to fine

        return deep_supervision_heads(decoded, out_shape, self.num_classes, self.layers, train,
                                      self.deep_supervision)


def resunet_from_config(model_config: ml_collections.ConfigDict, layers: Layers) -> ResUNet3D:
    """Returns the residual U-Net with `model.features`, `num_classes`, `deep_supervision`."""
    return ResUNet3D(features=tuple(model_config.features), num_classes=model_config.num_classes,
                     deep_supervision=model_config.deep_supervision, layers=layers)
