"""PyTorch twin of `livseg_jax.models.riunet.RIUNet` (RIU-Net after Lv, Wang & Wang 2022), NCDHW.

Same child names as the Flax module (`enc<s>`, `bottleneck`, `dec<s>` with `branch1/3/5.conv<i>`,
`fuse`, `shortcut`; `up<s>` ConvTranspose3d; `head<i>`), so `livseg_jax.interop.mapping`'s rules
map every tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from livseg_jax.interop.torch_layers import (
    ConvBN,
    TwinNetwork,
    activation_module,
    add_unet_decoder,
    checked_size,
    unet_decoder_forward,
)
from livseg_jax.models.riunet import ACTIVATION, BRANCH_RATIO, BRANCHES


class ConvChain(nn.Sequential):
    """Conv-BN-act units conv0, conv1, ... (first from c_in, then `width` wide)."""

    def __init__(self, c_in: int, width: int, kernels: Sequence[Sequence[int]], act: str, deploy: bool):
        super().__init__()
        for i, kernel in enumerate(kernels):
            self.add_module(f"conv{i}", ConvBN(c_in if i == 0 else width, width, kernel[0], act=act, deploy=deploy))


class ResInceptionBlock(nn.Module):
    """act(fuse(cat[branch1, branch3, branch5]) + shortcut(x)): (B, C_in, ...) -> (B, c_out, ...)."""

    def __init__(self, c_in: int, c_out: int, act: str = ACTIVATION, deploy: bool = False):
        super().__init__()
        width = max(c_out // BRANCH_RATIO, 1)
        for name, kernels in BRANCHES.items():
            self.add_module(name, ConvChain(c_in, width, kernels, act, deploy))
        self.fuse = ConvBN(width * len(BRANCHES), c_out, 1, deploy=deploy)
        self.shortcut = None if c_in == c_out else ConvBN(c_in, c_out, 1, deploy=deploy)
        self.act = activation_module(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([getattr(self, name)(x) for name in BRANCHES], dim=1))
        return self.act(y + (x if self.shortcut is None else self.shortcut(x)))


class TorchRIUNet(TwinNetwork):
    """RIU-Net on (B, C_in, D, H, W) -> logits; heads coarse to fine like TorchUNet3D's."""

    def __init__(self, features: Sequence[int] = (16, 32, 64, 128, 256), num_classes: int = 2,
                 deep_supervision: bool = True, deploy: bool = False, in_channels: int = 1):
        super().__init__(features, num_classes, deep_supervision, deploy, in_channels)
        levels = self.levels
        c = in_channels
        for s in range(levels - 1):
            self.add_module(f"enc{s}", ResInceptionBlock(c, features[s], deploy=deploy))
            c = features[s]
        self.bottleneck = ResInceptionBlock(c, features[-1], deploy=deploy)
        add_unet_decoder(self, features, lambda c_in, c_out: ResInceptionBlock(c_in, c_out, deploy=deploy),
                         num_classes, deploy)

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out_size = checked_size(x, self.levels)
        skips = []
        for s in range(self.levels - 1):
            x = getattr(self, f"enc{s}")(x)
            skips.append(x)
            x = F.max_pool3d(x, 2, 2)
        x = self.bottleneck(x)
        return unet_decoder_forward(self, x, skips, out_size, all_heads)


def torch_riunet_from_config(model_config: ml_collections.ConfigDict, deploy: bool, in_channels: int) -> TorchRIUNet:
    """Returns the TorchRIUNet twin of `build_model(model_config)` for `riunet`."""
    return TorchRIUNet(features=tuple(model_config.features), num_classes=model_config.num_classes,
                       deep_supervision=model_config.deep_supervision, deploy=deploy, in_channels=in_channels)
