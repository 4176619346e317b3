"""PyTorch twin of `livseg_jax.models.resunet.ResUNet3D` (Zhang, Liu & Wang 2018, in 3D), NCDHW.

Module names are those of the Flax model (`enc1.preact`, `enc1.conv1.bn`, `dec0.shortcut.conv`,
`up2`, `head3`, ...), so `livseg_jax.interop.mapping` converts it with the family's rules.
Imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import torch
from torch import nn

from livseg_jax.interop.torch_layers import (
    ChannelAffine,
    ConvBN,
    TwinNetwork,
    activation_module,
    add_unet_decoder,
    batch_norm3d,
    checked_size,
    unet_decoder_forward,
)
from livseg_jax.models import names
from livseg_jax.models.resunet import ACTIVATION


class ResidualUnit(nn.Module):
    """[BN-act-]Conv3x3x3(stride, padding 1)-BN-act-Conv3x3x3 + Conv1x1x1(stride)-BN."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, preact: bool = True, deploy: bool = False):
        super().__init__()
        if preact:
            self.add_module(names.PREACT, ChannelAffine(c_in) if deploy else batch_norm3d(c_in))
        self.preact_act = activation_module(ACTIVATION) if preact else nn.Identity()
        self.conv1 = ConvBN(c_in, c_out, 3, act=ACTIVATION, deploy=deploy)
        if stride > 1:  # ConvBN pads 0 when strided (its 2x2x2 down-samplings); this conv pads 1
            conv = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=deploy)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            self.conv1.add_module(names.CONV, conv)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.shortcut = ConvBN(c_in, c_out, 1, stride=stride, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, names.PREACT):
            h = self.preact_act(getattr(self, names.PREACT)(x))
        return self.conv2(self.conv1(h)) + self.shortcut(x)


class TorchResUNet3D(TwinNetwork):
    """Residual U-Net on (B, C_in, D, H, W) -> logits; heads as `TorchUNet3D` (`all_heads`)."""

    def __init__(self, features: Sequence[int] = (16, 32, 64, 128, 256), num_classes: int = 2,
                 deep_supervision: bool = True, deploy: bool = False, in_channels: int = 1):
        super().__init__(features, num_classes, deep_supervision, deploy, in_channels)
        levels = self.levels
        c = in_channels
        for s in range(levels - 1):
            self.add_module(f"enc{s}", ResidualUnit(c, features[s], 1 if s == 0 else 2, s > 0, deploy))
            c = features[s]
        self.bottleneck = ResidualUnit(c, features[-1], 2, True, deploy)
        add_unet_decoder(self, features, lambda c_in, c_out: ResidualUnit(c_in, c_out, deploy=deploy),
                         num_classes, deploy)

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out_size = checked_size(x, self.levels)
        skips = []
        for s in range(self.levels - 1):
            x = getattr(self, f"enc{s}")(x)
            skips.append(x)
        x = self.bottleneck(x)
        return unet_decoder_forward(self, x, skips, out_size, all_heads)


def torch_resunet_from_config(model_config: ml_collections.ConfigDict, deploy: bool,
                              in_channels: int) -> TorchResUNet3D:
    """Returns the twin of `resunet_from_config(model_config)`."""
    return TorchResUNet3D(features=tuple(model_config.features), num_classes=model_config.num_classes,
                          deep_supervision=model_config.deep_supervision, deploy=deploy,
                          in_channels=in_channels)
