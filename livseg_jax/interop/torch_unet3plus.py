"""PyTorch twin of `livseg_jax.models.unet3plus.UNet3Plus` (UNet 3+, Huang et al. 2020), NCDHW.

Same child names as the Flax module (`enc<s>`, `bottleneck`, `dec<i>.scale<j>`, `dec<i>.fuse`,
`head<i>`), so `livseg_jax.interop.mapping`'s rules map every tensor. Max pooling and trilinear
up-sampling (align_corners=False) are parameter-free, as in the official code.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from livseg_jax.interop.torch_layers import ConvBN, DoubleConv, TwinNetwork, add_heads, checked_size, heads_forward
from livseg_jax.models.unet3plus import ACTIVATION, CAT_CHANNELS, HEAD_KERNEL


def _resample(x: torch.Tensor, source: int, level: int) -> torch.Tensor:
    if source < level:
        k = 2 ** (level - source)
        return F.max_pool3d(x, k, k)
    if source > level:
        return F.interpolate(x, scale_factor=2 ** (source - level), mode="trilinear", align_corners=False)
    return x


class FullScaleDecoderLevel(nn.Module):
    """One decoder level: every scale resampled to this level, to `cat` channels, concatenated, fused."""

    def __init__(self, level: int, in_channels: Sequence[int], cat: int, act: str, deploy: bool):
        super().__init__()
        self.level = level
        for j, c in enumerate(in_channels):
            self.add_module(f"scale{j}", ConvBN(c, cat, 3, act=act, deploy=deploy))
        self.fuse = ConvBN(cat * len(in_channels), cat * len(in_channels), 3, act=act, deploy=deploy)

    def forward(self, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = [getattr(self, f"scale{j}")(_resample(s, j, self.level)) for j, s in enumerate(sources)]
        return self.fuse(torch.cat(parts, dim=1))


class TorchUNet3Plus(TwinNetwork):
    """UNet 3+ on (B, C_in, D, H, W) -> logits; heads bottleneck first, coarse to fine.

    Training mode (with deep supervision) or `all_heads=True` returns every head resized to the
    input; evaluation the finest. The deploy form has BatchNorm folded and only the finest head.
    """

    def __init__(self, features: Sequence[int] = (64, 128, 256, 512, 1024), num_classes: int = 2,
                 cat_channels: int = CAT_CHANNELS, deep_supervision: bool = True, deploy: bool = False,
                 in_channels: int = 1):
        super().__init__(features, num_classes, deep_supervision, deploy, in_channels, cat_channels=cat_channels)
        levels = self.levels
        c = in_channels
        for s in range(levels):
            name = "bottleneck" if s == levels - 1 else f"enc{s}"
            self.add_module(name, DoubleConv(c, features[s], ACTIVATION, deploy))
            c = features[s]
        up = cat_channels * levels
        for i in reversed(range(levels - 1)):
            widths = list(features[: i + 1]) + [up] * (levels - 2 - i) + [features[-1]]
            self.add_module(f"dec{i}", FullScaleDecoderLevel(i, widths, cat_channels, ACTIVATION, deploy))
        stage_widths = [features[-1]] + [up] * (levels - 1)  # coarse to fine
        add_heads(self, stage_widths, num_classes, deploy, HEAD_KERNEL)

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out_size = checked_size(x, self.levels)
        encoded = []
        for s in range(self.levels):
            if s > 0:
                x = F.max_pool3d(x, 2, 2)
            x = getattr(self, "bottleneck" if s == self.levels - 1 else f"enc{s}")(x)
            encoded.append(x)
        decoded = {self.levels - 1: encoded[-1]}
        for i in reversed(range(self.levels - 1)):
            sources = encoded[: i + 1] + [decoded[j] for j in range(i + 1, self.levels)]
            decoded[i] = getattr(self, f"dec{i}")(sources)
        stages = [decoded[j] for j in reversed(range(self.levels))]
        return heads_forward(self, stages, out_size, all_heads)


def torch_unet3plus_from_config(model_config: ml_collections.ConfigDict, deploy: bool,
                                in_channels: int) -> TorchUNet3Plus:
    """Returns the TorchUNet3Plus twin of `build_model(model_config)` for `unet3plus`."""
    return TorchUNet3Plus(
        features=tuple(model_config.features),
        num_classes=model_config.num_classes,
        cat_channels=model_config.get("cat_channels", CAT_CHANNELS),
        deep_supervision=model_config.deep_supervision,
        deploy=deploy,
        in_channels=in_channels,
    )
