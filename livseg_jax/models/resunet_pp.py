"""ResUNet++ in 3D: residual units, squeeze-and-excitation, ASPP and decoder attention (SPEC 1.5).

Follows Jha, Smedsrud, Riegler, Johansen, de Lange, Halvorsen & Johansen (2019), "ResUNet++: An
Advanced Architecture for Medical Image Segmentation" (IEEE ISM 2019), its Figure 2 and the
authors' Keras code (m_resunet.py), whose widths (16, 32, 64, 128, 256) are our five
`model.features` one to one:

- `enc0`, the stem (width features[0], full resolution): conv3x3 -> BN -> ReLU -> conv3x3, plus a
  1x1 conv + BN shortcut; `se0` after it.
- `enc1` .. `enc{L-2}` (L = len(features); features[1..3] at the paper's widths), each halving the
  resolution: pre-activation residual unit BN -> ReLU -> conv3x3 (stride 2) -> BN -> ReLU ->
  conv3x3, plus a 1x1 stride-2 conv + BN shortcut; `se<s>` after each.
- `bridge`: ASPP to features[L-1] at the coarsest resolution.
- Decoder, level k = L-3 .. 0: `att<k>` (attention on the decoder feature x guided by encoder
  feature `enc<k>` one level finer: BN-ReLU-conv3x3 of each, the encoder's max-pooled 2x2x2, summed,
  BN-ReLU-conv3x3 to the gate; output gate * x, no sigmoid, as the authors' code), `up<k>`,
  concatenation with `enc<k>`'s output, `dec<k>` (a residual unit, stride 1, width features[k+1]).
- `aspp_out`: ASPP to features[0] on the last decoder output; a 1x1x1 head.

The gated tensor is the decoder feature (the attention output is then up-sampled), as Figure 2 and
the code have it; the encoder skip steers it and is concatenated unchanged after the up-sampling.
SE (`SqueezeExcite`): global average pool -> 1x1x1 conv to C // 8 (no bias) -> ReLU -> 1x1x1 conv
to C (no bias) -> sigmoid -> per-channel scale. ASPP (`ASPP`): the sum of four parallel 3x3x3
conv + BN branches with dilation rates `ASPP_RATES` = (6, 12, 18, 1) (children `rate6`, `rate12`,
`rate18`, `rate1`), then a 1x1x1 conv with bias (`fuse`).

3D choices and deviations: 3x3x3 kernels and 2x2x2 pooling; the paper's dilation rates kept in
voxels on every axis (at the bridge, a small patch's coarse map is mostly padding for rate 18);
the stride-2 3x3x3 convs pad 1 on both sides (PyTorch's convention, not TF's "SAME" (0, 1));
our learned 2x up-sampling (`up<k>`, ConvTranspose3d(k=2, s=2) keeping the width) in place of
nearest up-sampling; SE only after the stem and the encoder units as in Figure 2 (the authors'
code also applies it in the decoder units); convolutions inside a conv + BN pair have no bias
(it would cancel); ReLU and the SE ratio 8 fixed (module constants; `model.activation` is not
read). The paper has one output: with `deep_supervision=True` training returns one head per
decoder level (`head<i>`, coarse to fine: on `dec<L-3>`, ..., `dec1` and on `aspp_out`), resized
to the input as `UNet3D`'s; evaluation and the deploy form use the finest. Three down-samplings
for five widths: a patch must divide by 2 ** (len(features) - 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from livseg_jax.models import names
from livseg_jax.models.layers import ConvBN, Layers
from livseg_jax.models.unet import SegmentationNetwork, deep_supervision_heads

Array = jax.Array

SE_RATIO = 8  # the authors' squeeze-and-excitation reduction
ASPP_RATES = (6, 12, 18, 1)  # dilation of the four parallel 3x3x3 branches, the paper's
PAD1 = ((1, 1),) * 3  # stride-2 3x3x3 convs: PyTorch's padding=1


class PreActConv(nn.Module):
    """BN -> ReLU -> conv3x3x3 (bias); the BN is a lone norm (`pre_bn`; deploy: affine)."""

    features: int
    stride: int = 1
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = nn.relu(self.layers.norm(train, name=names.PRE_NORM)(x))
        strided = self.stride > 1
        return self.layers.conv(self.features, (3, 3, 3), strides=(self.stride,) * 3 if strided else None,
                                padding=PAD1 if strided else "SAME", name=names.CONV)(x)


class SqueezeExcite(nn.Module):
    """x * sigmoid(excite(relu(squeeze(mean over D, H, W of x)))): one scale in (0, 1) per channel."""

    ratio: int = SE_RATIO
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        s = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
        s = nn.relu(self.layers.conv(max(c // self.ratio, 1), (1, 1, 1), use_bias=False, name="squeeze")(s))
        s = nn.sigmoid(self.layers.conv(c, (1, 1, 1), use_bias=False, name="excite")(s))
        return x * s


class ASPP(nn.Module):
    """fuse(sum over rates r of BN(conv3x3x3 dilated r (x))): atrous spatial pyramid pooling."""

    features: int
    rates: Sequence[int] = ASPP_RATES
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = sum(ConvBN(self.features, (3, 3, 3), layers=self.layers, dilation=r, name=f"rate{r}")(x, train)
                for r in self.rates)
        return self.layers.conv(self.features, (1, 1, 1), name="fuse")(y)


class ResidualUnit(nn.Module):
    """Pre-activation residual unit: pre1(pre0(x)) + BN(conv1x1x1(x)), both with stride `stride`.

    `stem=True`: the input stem, conv3x3x3 -> [BN -> ReLU -> conv3x3x3] (no BN-ReLU on the input).
    """

    features: int
    stride: int = 1
    stem: bool = False
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.stem:
            y = self.layers.conv(self.features, (3, 3, 3), name="conv0")(x)
        else:
            y = PreActConv(self.features, self.stride, self.layers, name="pre0")(x, train)
        y = PreActConv(self.features, 1, self.layers, name="pre1")(y, train)
        strides = (self.stride,) * 3 if self.stride > 1 else None
        return y + ConvBN(self.features, (1, 1, 1), strides=strides, layers=self.layers, name="shortcut")(x, train)


class Attention(nn.Module):
    """gate(enc(g) max-pooled 2x + dec(x)) * x, each a `PreActConv` to x's width (the authors')."""

    layers: Layers = Layers()

    @nn.compact
    def __call__(self, g: Array, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        gp = self.layers.max_pool(PreActConv(c, 1, self.layers, name="enc")(g, train), 2)
        s = gp + PreActConv(c, 1, self.layers, name="dec")(x, train)
        return PreActConv(c, 1, self.layers, name="gate")(s, train) * x


class ResUNetPP3D(SegmentationNetwork):
    """ResUNet++ on (B, D, H, W, C_in) returning logits (B, D, H, W, num_classes); see the module doc."""


    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | tuple[Array, ...]:
        f = tuple(self.features)
        if len(f) < 3:
            raise ValueError(f"ResUNet++ needs at least 3 widths (stem, one encoder unit, bridge), got {f}")
        x, out_shape = self.checked_input(x, len(f) - 1)  # len(f) - 2 down-samplings

        skips = []
        for s in range(len(f) - 1):
            unit = ResidualUnit(f[s], 1 if s == 0 else 2, s == 0, self.layers, name=f"enc{s}")
            x = SqueezeExcite(layers=self.layers, name=f"se{s}")(unit(x, train))
            skips.append(x)
        x = ASPP(f[-1], layers=self.layers, name="bridge")(x, train)

        decoded = []
        for k in reversed(range(len(f) - 2)):
            x = Attention(self.layers, name=f"att{k}")(skips[k], x, train)
            x = self.layers.upsample(x.shape[-1], name=f"{names.UP}{k}")(x)
            x = jnp.concatenate([x, skips[k]], axis=-1)
            x = ResidualUnit(f[k + 1], layers=self.layers, name=f"dec{k}")(x, train)
            decoded.append(x)  # coarse to fine
        decoded[-1] = ASPP(f[0], layers=self.layers, name="aspp_out")(x, train)
        return deep_supervision_heads(decoded, out_shape, self.num_classes, self.layers, train, self.deep_supervision)


def resunet_pp_from_config(model_config: ml_collections.ConfigDict, layers: Layers) -> ResUNetPP3D:
    """Returns the ResUNet++ of the `model` section (widths `features`; the paper's constants)."""
    return ResUNetPP3D(features=tuple(model_config.features), num_classes=model_config.num_classes,
                       deep_supervision=model_config.deep_supervision, layers=layers)
