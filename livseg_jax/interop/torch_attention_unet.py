"""PyTorch twin of `livseg_jax.models.attention_unet.AttentionUNet3D` (Oktay et al. 2018), NCDHW.

Module names are those of the Flax model (`enc0.conv1.bn`, `gate2.theta`, `up1`, `head3`, ...), so
`livseg_jax.interop.mapping` converts it with the family's rules. Imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from livseg_jax.interop.torch_layers import ConvBN, DoubleConv, TwinNetwork, add_heads, checked_size, heads_forward
from livseg_jax.models import names
from livseg_jax.models.attention_unet import ACTIVATION, GATE_SUBSAMPLE


class AttentionGate(nn.Module):
    """Additive grid attention gate on skip x (B, C, D, H, W) and gating g on the half-size grid."""

    def __init__(self, channels: int, gating_channels: int, inter: int, deploy: bool = False):
        super().__init__()
        s = GATE_SUBSAMPLE
        self.theta = nn.Conv3d(channels, inter, s, stride=s, bias=False)
        self.phi = nn.Conv3d(gating_channels, inter, 1)
        self.psi = nn.Conv3d(inter, 1, 1)
        self.project = ConvBN(channels, channels, 1, deploy=deploy)

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(x) + self.phi(g))))
        return F.interpolate(alpha, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.project(self.coefficients(x, g) * x)


class TorchAttentionUNet3D(TwinNetwork):
    """Attention U-Net on (B, C_in, D, H, W) -> logits; heads as `TorchUNet3D` (`all_heads`)."""

    def __init__(self, features: Sequence[int] = (16, 32, 64, 128, 256), num_classes: int = 2,
                 deep_supervision: bool = True, deploy: bool = False, in_channels: int = 1):
        super().__init__(features, num_classes, deep_supervision, deploy, in_channels)
        levels = self.levels
        c = in_channels
        for s in range(levels - 1):
            self.add_module(f"enc{s}", DoubleConv(c, features[s], ACTIVATION, deploy))
            c = features[s]
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = DoubleConv(c, features[-1], ACTIVATION, deploy)
        self.gating = ConvBN(features[-1], features[-1], 1, act=ACTIVATION, deploy=deploy)
        for s in reversed(range(levels - 1)):
            self.add_module(f"gate{s}", AttentionGate(features[s], features[s + 1], max(features[s] // 2, 1), deploy))
            self.add_module(f"{names.UP}{s}", nn.ConvTranspose3d(features[s + 1], features[s], 2, stride=2))
            self.add_module(f"dec{s}", DoubleConv(2 * features[s], features[s], ACTIVATION, deploy))
        # head i sits on the i-th decoder output, coarse to fine: dec{levels-2-i}.
        add_heads(self, features[-2::-1], num_classes, deploy)

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out_size = checked_size(x, self.levels)
        skips = []
        for s in range(self.levels - 1):
            x = getattr(self, f"enc{s}")(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        g = self.gating(x)
        decoded = []
        for s in reversed(range(self.levels - 1)):
            gated = getattr(self, f"gate{s}")(skips[s], g)
            x = getattr(self, f"dec{s}")(torch.cat([getattr(self, f"{names.UP}{s}")(x), gated], dim=1))
            decoded.append(x)
            g = x
        return heads_forward(self, decoded, out_size, all_heads)


def torch_attention_unet_from_config(model_config: ml_collections.ConfigDict, deploy: bool,
                                     in_channels: int) -> TorchAttentionUNet3D:
    """Returns the twin of `attention_unet_from_config(model_config)`."""
    return TorchAttentionUNet3D(features=tuple(model_config.features), num_classes=model_config.num_classes,
                                deep_supervision=model_config.deep_supervision, deploy=deploy,
                                in_channels=in_channels)
