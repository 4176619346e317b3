"""PyTorch twins of the model family (SPEC 1), the table of every twin, and re-parameterisation.

Layout is PyTorch's NCDHW. Every module carries the same name as its Flax counterpart in
`livseg_jax.models` (`enc0.rep1.dense.bn`, `msca2.attention.strip11_0`, `up3`, `head3`, ...), so
the name table in `livseg_jax.interop.mapping` only renames leaves and moves kernel axes. The names
that the table and re-parameterisation test come from `livseg_jax.models.names`.

Padding: Flax "SAME" on a stride-1 odd kernel pads k // 2 on both sides, which is PyTorch's
`padding=k // 2` per axis; the stride-2 down-sampling convs are "VALID" (padding 0). This module
imports torch at import time: import it only where torch is installed (the `torch` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from livseg_jax.interop import (
    torch_attention_unet,
    torch_r2unet,
    torch_resunet,
    torch_resunet_pp,
    torch_riunet,
    torch_unet3plus,
)
from livseg_jax.interop.torch_layers import (  # noqa: F401 (re-exported: the twins' units)
    BN_MOMENTUM,
    ChannelAffine,
    ConvBN,
    DoubleConv,
    ELANResBlock,
    RepConv3d,
    activation_module,
    add_heads,
    add_unet_decoder,
    batch_norm3d,
    unet_decoder_forward,
)
from livseg_jax.models import names

# One source for the architecture constants: the Flax model family.
from livseg_jax.models.msca import LAYER_SCALE_INIT, STRIP_SIZES, strip_kernels  # noqa: F401 (re-exported)
from livseg_jax.models.unet import VARIANTS  # noqa: F401 (re-exported)


def _conv(ndim: int, c_in: int, c_out: int, kernel: Sequence[int], groups: int = 1) -> nn.Module:
    cls = nn.Conv2d if ndim == 2 else nn.Conv3d
    return cls(c_in, c_out, tuple(kernel), padding=tuple(k // 2 for k in kernel), groups=groups)


class MSCAttention(nn.Module):
    """Multi-scale strip-convolution attention on (N, C, *spatial); a linear gate on its input."""

    def __init__(self, channels: int, ndim: int):
        super().__init__()
        self.dw5 = _conv(ndim, channels, channels, (5,) * ndim, groups=channels)
        self.scales = []
        for size in STRIP_SIZES:
            strips = []
            for j, kernel in enumerate(strip_kernels(size, ndim)):
                self.add_module(f"strip{size}_{j}", _conv(ndim, channels, channels, kernel, channels))
                strips.append(f"strip{size}_{j}")
            self.scales.append(strips)
        self.mix = _conv(ndim, channels, channels, (1,) * ndim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        a = self.dw5(u)
        s = 0
        for strips in self.scales:
            y = a
            for name in strips:
                y = getattr(self, name)(y)
            s = s + y
        return self.mix(a + s) * u


class MSCABlock(nn.Module):
    """MSCA block on (B, C, D, H, W); mode "2d" runs Conv2d on axial slices (B*D, C, H, W)."""

    def __init__(self, channels: int, mode: str = "2d", mlp_ratio: int = 4, deploy: bool = False):
        super().__init__()
        if mode not in ("2d", "3d"):
            raise ValueError(f"msca_mode must be '2d' or '3d', got {mode!r}")
        self.ndim = 2 if mode == "2d" else 3
        ndim, c, hidden = self.ndim, channels, mlp_ratio * channels
        self.layer_scale1 = nn.Parameter(torch.full((c,), LAYER_SCALE_INIT))
        self.layer_scale2 = nn.Parameter(torch.full((c,), LAYER_SCALE_INIT))
        norm1, norm2 = names.MSCA_NORMS
        self.add_module(norm1, ChannelAffine(c) if deploy else batch_norm3d(c))
        self.proj_in = _conv(ndim, c, c, (1,) * ndim)
        self.attention = MSCAttention(c, ndim)
        self.proj_out = _conv(ndim, c, c, (1,) * ndim)
        self.add_module(norm2, ChannelAffine(c) if deploy else batch_norm3d(c))
        self.fc1 = _conv(ndim, c, hidden, (1,) * ndim)
        self.dw3 = _conv(ndim, hidden, hidden, (3,) * ndim, groups=hidden)
        self.fc2 = _conv(ndim, hidden, c, (1,) * ndim)

    def _fold(self, t: torch.Tensor) -> torch.Tensor:
        if self.ndim == 3:
            return t
        b, c, d, h, w = t.shape
        return t.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)

    def _unfold(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.ndim == 3:
            return t
        b, _, d, h, w = like.shape
        return t.reshape(b, d, t.shape[1], h, w).permute(0, 2, 1, 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ls1 = self.layer_scale1.view(1, -1, 1, 1, 1)
        ls2 = self.layer_scale2.view(1, -1, 1, 1, 1)
        norm1, norm2 = (getattr(self, name) for name in names.MSCA_NORMS)
        y = self._fold(norm1(x))
        z = self.attention(F.gelu(self.proj_in(y)))
        z = self.proj_out(z) + y
        x = x + ls1 * self._unfold(z, x)
        y = self._fold(norm2(x))
        z = self.fc2(F.gelu(self.dw3(self.fc1(y))))
        return x + ls2 * self._unfold(z, x)


class TorchUNet3D(nn.Module):
    """PyTorch twin of `livseg_jax.models.UNet3D` on (B, C_in, D, H, W) -> logits (B, K, D, H, W).

    In training mode (with deep supervision) `forward` returns the per-decoder-stage logits coarse
    to fine, each resized to the input (trilinear, align_corners=False); in evaluation mode only
    the finest. `all_heads=True` returns every head in either mode. The deploy form has only the
    finest head.
    """

    def __init__(self, features: Sequence[int] = (16, 32, 64, 128, 256), num_classes: int = 2,
                 block: str = "elanres", msca_stages: Sequence[int] = (1, 2, 3, 4),
                 msca_mode: str = "2d", activation: str = "silu", n_rep: int = 2,
                 dropout: float = 0.0, deep_supervision: bool = True, deploy: bool = False,
                 in_channels: int = 1):
        super().__init__()
        self.hparams: dict[str, Any] = dict(
            features=tuple(features), num_classes=num_classes, block=block,
            msca_stages=tuple(msca_stages), msca_mode=msca_mode, activation=activation,
            n_rep=n_rep, dropout=dropout, deep_supervision=deep_supervision, deploy=deploy,
            in_channels=in_channels,
        )
        self.levels = levels = len(features)
        self.msca_stages = tuple(msca_stages)
        self.deep_supervision = deep_supervision
        self.deploy = deploy

        def make_block(c_in: int, c_out: int) -> nn.Module:
            if block == "elanres":
                return ELANResBlock(c_in, c_out, activation, n_rep, deploy)
            if block == "double":
                return DoubleConv(c_in, c_out, activation, deploy)
            raise ValueError(f"unknown block kind {block!r}")

        c = in_channels
        for s in range(levels - 1):
            self.add_module(f"enc{s}", make_block(c, features[s]))
            if s in self.msca_stages:
                self.add_module(f"msca{s}", MSCABlock(features[s], msca_mode, deploy=deploy))
            self.add_module(f"down{s}", ConvBN(features[s], features[s + 1], 2, stride=2,
                                               act=activation, deploy=deploy))
            c = features[s + 1]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bottleneck = make_block(c, features[-1])
        if levels - 1 in self.msca_stages:
            self.add_module(f"msca{levels - 1}", MSCABlock(features[-1], msca_mode, deploy=deploy))
        add_unet_decoder(self, features, make_block, num_classes, deploy)

    def _msca(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"msca{stage}")(x) if stage in self.msca_stages else x

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if x.ndim != 5:
            raise ValueError(f"expected input (B, C, D, H, W), got shape {tuple(x.shape)}")
        factor = 2 ** (self.levels - 1)
        if any(size % factor for size in x.shape[2:]):
            raise ValueError(f"patch {tuple(x.shape[2:])} is not divisible by {factor}")
        out_size = tuple(x.shape[2:])
        skips = []
        for s in range(self.levels - 1):
            x = self._msca(s, getattr(self, f"enc{s}")(x))
            skips.append(x)
            x = getattr(self, f"down{s}")(x)
        x = self._msca(self.levels - 1, self.bottleneck(self.dropout(x)))
        return unet_decoder_forward(self, x, skips, out_size, all_heads)


def torch_model_from_config(model_config: ml_collections.ConfigDict, deploy: bool | None = None,
                            in_channels: int = 1) -> nn.Module:
    """Returns the float32 PyTorch twin of `livseg_jax.models.build_model(model_config)`."""
    name = model_config.name
    if name not in TORCH_NETWORKS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(TORCH_NETWORKS)}")
    deploy = model_config.deploy if deploy is None else deploy
    return TORCH_NETWORKS[name](model_config, deploy, in_channels)


def torch_unet_from_config(model_config: ml_collections.ConfigDict, deploy: bool, in_channels: int) -> TorchUNet3D:
    """Returns the TorchUNet3D twin of one of the paper's variants (`VARIANTS`)."""
    block, uses_msca = VARIANTS[model_config.name]
    return TorchUNet3D(
        features=tuple(model_config.features),
        num_classes=model_config.num_classes,
        block=block,
        msca_stages=tuple(model_config.msca_stages) if uses_msca else (),
        msca_mode=model_config.msca_mode,
        activation=model_config.activation,
        n_rep=model_config.n_rep,
        dropout=model_config.dropout,
        deep_supervision=model_config.deep_supervision,
        deploy=deploy,
        in_channels=in_channels,
    )


# model.name -> constructor(model section, deploy, in_channels) of the twin; the comparison
# networks' twins (SPEC 1.5) are added below the paper's family.
TORCH_NETWORKS = {
    **{name: torch_unet_from_config for name in VARIANTS},
    "attention_unet": torch_attention_unet.torch_attention_unet_from_config,
    "resunet": torch_resunet.torch_resunet_from_config,
    "unet3plus": torch_unet3plus.torch_unet3plus_from_config,
    "riunet": torch_riunet.torch_riunet_from_config,
    "r2unet": torch_r2unet.torch_r2unet_from_config,
    "resunet_pp": torch_resunet_pp.from_config,
}


# ------------------------------------------------------------------------------------------------
# Re-parameterisation (training -> deploy), done in float64 like the Flax side.


def _bn_affine(bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (scale, shift) in float64 of an evaluation-mode BatchNorm."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def fold_conv_bn_torch(unit: ConvBN) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weight (O, I, k, k, k), bias (O,)) in float64 of a ConvBN with its BN folded in."""
    scale, shift = _bn_affine(getattr(unit, names.BN))
    conv = getattr(unit, names.CONV)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1, 1)
    bias = shift if conv.bias is None else shift + conv.bias.double() * scale
    return weight, bias


def fold_repconv_torch(rep: RepConv3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weight (C, C, 3, 3, 3), bias (C,)) in float64 of RepConv3d's branches summed."""
    w3, b3 = fold_conv_bn_torch(getattr(rep, names.REP_DENSE))
    w1, b1 = fold_conv_bn_torch(getattr(rep, names.REP_POINT))
    weight = w3 + F.pad(w1, [1, 1, 1, 1, 1, 1])
    scale, shift = _bn_affine(getattr(rep, names.REP_IDENTITY))
    channels = torch.arange(scale.shape[0])
    weight[channels, channels, 1, 1, 1] += scale
    return weight, b3 + b1 + shift


@torch.no_grad()
def reparameterize_torch(model: nn.Module) -> nn.Module:
    """Returns the deploy-form twin (BN folded, RepConv merged, lone norms as affine) of `model`.

    `model` is any twin with `deploy` and `hparams` (its constructor's arguments).
    """
    if model.deploy:
        raise ValueError("reparameterize_torch: the model is already in deploy form")
    deploy = type(model)(**{**model.hparams, "deploy": True})
    target = deploy.state_dict()
    folded: dict[str, torch.Tensor] = {}
    done: list[str] = []  # module prefixes whose tensors were folded
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(p) for p in done):
            continue
        if isinstance(module, ConvBN):
            weight, bias = fold_conv_bn_torch(module)
        elif isinstance(module, RepConv3d):
            weight, bias = fold_repconv_torch(module)
        elif isinstance(module, nn.BatchNorm3d):  # MSCA's norms: no conv before them
            weight, bias = _bn_affine(module)
            folded[f"{prefix}weight"], folded[f"{prefix}bias"] = weight.float(), bias.float()
            done.append(prefix)
            continue
        else:
            continue
        conv = f"{prefix}{names.CONV}"
        folded[f"{conv}.weight"], folded[f"{conv}.bias"] = weight.float(), bias.float()
        done.append(prefix)
    for key, value in model.state_dict().items():
        if key in target and not any(key.startswith(p) for p in done):
            folded[key] = value.clone()  # MSCA convs, layer scales, up-sampling, the finest head
    deploy.load_state_dict(folded, strict=True)
    return deploy.train(model.training)


def state_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Returns {state-dict key: (shape, numpy dtype)} of a torch model, in state-dict order."""
    return {k: (tuple(v.shape), v.detach().cpu().numpy().dtype) for k, v in model.state_dict().items()}
