"""R2U-Net in 3D: a U-Net of recurrent residual convolutional units (SPEC 1.5).

Follows Alom, Hasan, Yakopcic, Taha & Asari (2018), "Recurrent Residual Convolutional Neural
Network based on U-Net (R2U-Net) for Medical Image Segmentation" (arXiv:1802.06955), in the layout
of its widely used reference implementation (RRCNN blocks of two recurrent layers):

- RRCNN block (`RRCNNBlock`): a 1x1x1 convolution with bias to the block's width (`proj`), then two
  recurrent convolutional layers (`rec0`, `rec1`), plus the residual addition of `proj`'s output.
- Recurrent layer (`RecurrentConv`) with t = 2: one 3x3x3 conv -> BatchNorm -> ReLU unit f, applied
  t + 1 times with the SAME weights: x_1 = f(x), x_{k+1} = f(x + x_k), output x_{t+1}. Its
  BatchNorm is therefore applied t + 1 times with shared parameters: in training each application
  normalises with its own batch statistics and updates the running averages in turn (PyTorch does
  the same); in evaluation and the deploy form the running statistics fold into the shared conv.
- Encoder: one RRCNN block per level, widths `features` (the paper: 64, 128, 256, 512, 1024 over 5
  levels); down-sampling by 2x2x2 max-pooling as in the paper (no weights).
- Decoder: our learned 2x up-sampling (`up<i>`, a ConvTranspose3d(k=2, s=2) to the level's width;
  the paper's up-convolution is nearest up-sampling + 3x3 conv + BN + ReLU), concatenation with the
  encoder skip, an RRCNN block.
- Output: a 1x1x1 head. The paper has one output; with `deep_supervision=True` training returns one
  head per decoder level (`head<i>`, coarse to fine, resized trilinearly to the input) the same way
  as our family (`UNet3D`); evaluation and the deploy form use the finest head only.

3D choices: all kernels 3x3x3 / 1x1x1 / 2x2x2 in place of the paper's 2D ones; ReLU and t = 2 as
the paper (fields; `model.activation` is not read); widths from `model.features`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from livseg_jax.models import names
from livseg_jax.models.layers import ConvBN, Layers, activation_fn
from livseg_jax.models.unet import SegmentationNetwork, deep_supervision_heads

Array = jax.Array

RECURRENT_STEPS = 2  # the paper's t
ACTIVATION = "relu"  # the paper's


class RecurrentConv(nn.Module):
    """Recurrent conv layer: x_1 = f(x), x_{k+1} = f(x + x_k), k < t; f one shared ConvBN + act."""

    features: int
    act: Callable[[Array], Array]
    steps: int = RECURRENT_STEPS
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        f = ConvBN(self.features, (3, 3, 3), act=self.act, layers=self.layers, name="unit")
        y = f(x, train)
        for _ in range(self.steps):
            y = f(x + y, train)
        return y


class RRCNNBlock(nn.Module):
    """Recurrent residual block: p = proj(x) (1x1x1, bias); p + rec1(rec0(p))."""

    features: int
    act: Callable[[Array], Array]
    steps: int = RECURRENT_STEPS
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        p = self.layers.conv(self.features, (1, 1, 1), name="proj")(x)
        y = RecurrentConv(self.features, self.act, self.steps, self.layers, name="rec0")(p, train)
        y = RecurrentConv(self.features, self.act, self.steps, self.layers, name="rec1")(y, train)
        return p + y


class R2UNet3D(SegmentationNetwork):
    """R2U-Net on (B, D, H, W, C_in) returning logits (B, D, H, W, num_classes); see the module doc."""

    steps: int = RECURRENT_STEPS
    activation: str = ACTIVATION

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | tuple[Array, ...]:
        x, out_shape = self.checked_input(x)
        levels = len(self.features)
        act = activation_fn(self.activation)

        skips = []
        for s in range(levels - 1):
            x = RRCNNBlock(self.features[s], act, self.steps, self.layers, name=f"enc{s}")(x, train)
            skips.append(x)
            x = self.layers.max_pool(x, 2)
        x = RRCNNBlock(self.features[-1], act, self.steps, self.layers, name="bottleneck")(x, train)

        decoded = []
        for s in reversed(range(levels - 1)):
            x = self.layers.upsample(self.features[s], name=f"{names.UP}{s}")(x)
            x = jnp.concatenate([x, skips[s]], axis=-1)
            x = RRCNNBlock(self.features[s], act, self.steps, self.layers, name=f"dec{s}")(x, train)
            decoded.append(x)  # coarse to fine
        return deep_supervision_heads(decoded, out_shape, self.num_classes, self.layers, train, self.deep_supervision)


def r2unet_from_config(model_config: ml_collections.ConfigDict, layers: Layers) -> R2UNet3D:
    """Returns the R2U-Net of the `model` section (widths `features`; t and ReLU the paper's)."""
    return R2UNet3D(features=tuple(model_config.features), num_classes=model_config.num_classes,
                    deep_supervision=model_config.deep_supervision, layers=layers)


__all__ = ["R2UNet3D", "RRCNNBlock", "RecurrentConv", "r2unet_from_config"]
