"""PyTorch twin of `livseg_jax.models.resunet_pp.ResUNetPP3D` (NCDHW; the Flax model's child names).

ResUNet++ (Jha et al. 2019) as a PyTorch user would write it; see the Flax module for the layout and
the 3D choices. The deploy form (`deploy=True`, or `torch_models.reparameterize_torch`) folds every
conv + BN pair and turns the pre-activation BatchNorms (`pre_bn`) into per-channel affines.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from livseg_jax.interop.torch_layers import (
    ChannelAffine,
    ConvBN,
    TwinNetwork,
    add_heads,
    batch_norm3d,
    checked_size,
    heads_forward,
)
from livseg_jax.models import names
from livseg_jax.models.resunet_pp import ASPP_RATES, SE_RATIO


class PreActConv(nn.Module):
    """BN -> ReLU -> Conv3d 3x3x3 (bias, padding 1)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, deploy: bool = False):
        super().__init__()
        self.add_module(names.PRE_NORM, ChannelAffine(c_in) if deploy else batch_norm3d(c_in))
        self.add_module(names.CONV, nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, names.CONV)(F.relu(getattr(self, names.PRE_NORM)(x)))


class SqueezeExcite(nn.Module):
    """Channel rescaling by sigmoid(excite(relu(squeeze(global average pool))))."""

    def __init__(self, channels: int, ratio: int = SE_RATIO):
        super().__init__()
        hidden = max(channels // ratio, 1)
        self.squeeze = nn.Conv3d(channels, hidden, 1, bias=False)
        self.excite = nn.Conv3d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool3d(x, 1)
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(s))))


class ASPP(nn.Module):
    """Sum of dilated 3x3x3 conv + BN branches, then a 1x1x1 conv."""

    def __init__(self, c_in: int, c_out: int, rates: Sequence[int] = ASPP_RATES, deploy: bool = False):
        super().__init__()
        self.rates = tuple(rates)
        for r in self.rates:
            self.add_module(f"rate{r}", ConvBN(c_in, c_out, 3, dilation=r, deploy=deploy))
        self.fuse = nn.Conv3d(c_out, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(sum(getattr(self, f"rate{r}")(x) for r in self.rates))


class ResidualUnit(nn.Module):
    """pre1(pre0(x)) + shortcut(x); the stem starts with a plain conv0 instead of pre0."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, stem: bool = False, deploy: bool = False):
        super().__init__()
        self.stem = stem
        if stem:
            self.conv0 = nn.Conv3d(c_in, c_out, 3, padding=1)
        else:
            self.pre0 = PreActConv(c_in, c_out, stride, deploy)
        self.pre1 = PreActConv(c_out, c_out, 1, deploy)
        self.shortcut = ConvBN(c_in, c_out, 1, stride=stride, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv0(x) if self.stem else self.pre0(x)
        return self.pre1(y) + self.shortcut(x)


class Attention(nn.Module):
    """gate(maxpool(enc(g)) + dec(x)) * x."""

    def __init__(self, c_enc: int, c_dec: int, deploy: bool = False):
        super().__init__()
        self.enc = PreActConv(c_enc, c_dec, 1, deploy)
        self.dec = PreActConv(c_dec, c_dec, 1, deploy)
        self.gate = PreActConv(c_dec, c_dec, 1, deploy)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.gate(F.max_pool3d(self.enc(g), 2) + self.dec(x)) * x


class TorchResUNetPP3D(TwinNetwork):
    """ResUNet++ on (B, C_in, D, H, W) -> logits; heads and modes as `TorchUNet3D`."""

    def __init__(self, features: Sequence[int] = (16, 32, 64, 128, 256), num_classes: int = 2,
                 deep_supervision: bool = True, deploy: bool = False, in_channels: int = 1):
        super().__init__(features, num_classes, deep_supervision, deploy, in_channels)
        self.features = f = tuple(features)
        c = in_channels
        for s in range(len(f) - 1):
            self.add_module(f"enc{s}", ResidualUnit(c, f[s], 1 if s == 0 else 2, s == 0, deploy))
            self.add_module(f"se{s}", SqueezeExcite(f[s]))
            c = f[s]
        self.bridge = ASPP(c, f[-1], deploy=deploy)
        c = f[-1]
        for k in reversed(range(len(f) - 2)):
            self.add_module(f"att{k}", Attention(f[k], c, deploy))
            self.add_module(f"{names.UP}{k}", nn.ConvTranspose3d(c, c, 2, stride=2))
            self.add_module(f"dec{k}", ResidualUnit(c + f[k], f[k + 1], deploy=deploy))
            c = f[k + 1]
        self.aspp_out = ASPP(c, f[0], deploy=deploy)
        n = len(f) - 2
        widths = [f[k + 1] for k in reversed(range(1, n))] + [f[0]]  # head i's input, coarse to fine
        add_heads(self, widths, num_classes, deploy)

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out_size = checked_size(x, len(self.features) - 1)
        skips = []
        for s in range(len(self.features) - 1):
            x = getattr(self, f"se{s}")(getattr(self, f"enc{s}")(x))
            skips.append(x)
        x = self.bridge(x)
        decoded = []
        for k in reversed(range(len(self.features) - 2)):
            x = getattr(self, f"att{k}")(skips[k], x)
            x = torch.cat([getattr(self, f"{names.UP}{k}")(x), skips[k]], dim=1)
            x = getattr(self, f"dec{k}")(x)
            decoded.append(x)
        decoded[-1] = self.aspp_out(x)
        return heads_forward(self, decoded, out_size, all_heads)


def from_config(model_config: ml_collections.ConfigDict, deploy: bool, in_channels: int) -> TorchResUNetPP3D:
    """Returns the twin of `resunet_pp_from_config(model_config)`."""
    return TorchResUNetPP3D(features=tuple(model_config.features), num_classes=model_config.num_classes,
                            deep_supervision=model_config.deep_supervision, deploy=deploy,
                            in_channels=in_channels)
