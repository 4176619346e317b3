"""PyTorch twin of `livseg_jax.models.r2unet.R2UNet3D` (NCDHW; same child names as the Flax model).

Written as a PyTorch user would write R2U-Net (Alom et al. 2018): the recurrent layer calls one
conv-BN-ReLU unit t + 1 times. Training and deploy forms as `TorchUNet3D`; the deploy form comes
from `torch_models.reparameterize_torch` (every `ConvBN` folded, the shared one once).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from livseg_jax.interop.torch_layers import ConvBN, TwinNetwork, add_unet_decoder, checked_size, unet_decoder_forward
from livseg_jax.models.r2unet import ACTIVATION, RECURRENT_STEPS


class RecurrentConv(nn.Module):
    """x_1 = unit(x), x_{k+1} = unit(x + x_k) for k < t; `unit` is one Conv3d-BN-ReLU."""

    def __init__(self, channels: int, act: str, steps: int, deploy: bool):
        super().__init__()
        self.unit = ConvBN(channels, channels, 3, act=act, deploy=deploy)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unit(x)
        for _ in range(self.steps):
            y = self.unit(x + y)
        return y


class RRCNNBlock(nn.Module):
    """p = proj(x); p + rec1(rec0(p))."""

    def __init__(self, c_in: int, c_out: int, act: str, steps: int, deploy: bool):
        super().__init__()
        self.proj = nn.Conv3d(c_in, c_out, 1)
        self.rec0 = RecurrentConv(c_out, act, steps, deploy)
        self.rec1 = RecurrentConv(c_out, act, steps, deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj(x)
        return p + self.rec1(self.rec0(p))


class TorchR2UNet3D(TwinNetwork):
    """R2U-Net on (B, C_in, D, H, W) -> logits; heads and modes as `TorchUNet3D`."""

    def __init__(self, features: Sequence[int] = (16, 32, 64, 128, 256), num_classes: int = 2,
                 deep_supervision: bool = True, steps: int = RECURRENT_STEPS,
                 activation: str = ACTIVATION, deploy: bool = False, in_channels: int = 1):
        super().__init__(features, num_classes, deep_supervision, deploy, in_channels, steps=steps,
                         activation=activation)
        levels = self.levels
        c = in_channels
        for s in range(levels - 1):
            self.add_module(f"enc{s}", RRCNNBlock(c, features[s], activation, steps, deploy))
            c = features[s]
        self.bottleneck = RRCNNBlock(c, features[-1], activation, steps, deploy)
        add_unet_decoder(self, features, lambda c_in, c_out: RRCNNBlock(c_in, c_out, activation, steps, deploy),
                         num_classes, deploy)

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out_size = checked_size(x, self.levels)
        skips = []
        for s in range(self.levels - 1):
            x = getattr(self, f"enc{s}")(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        x = self.bottleneck(x)
        return unet_decoder_forward(self, x, skips, out_size, all_heads)


def torch_r2unet_from_config(model_config: ml_collections.ConfigDict, deploy: bool,
                             in_channels: int) -> TorchR2UNet3D:
    """Returns the twin of `r2unet_from_config(model_config)`."""
    return TorchR2UNet3D(features=tuple(model_config.features), num_classes=model_config.num_classes,
                         deep_supervision=model_config.deep_supervision, deploy=deploy,
                         in_channels=in_channels)
