"""The PyTorch building units shared by every twin: conv + BatchNorm (+ activation), RepConv3d,
the ELAN block, the double conv, and the BatchNorm and activation factories.

Layout is PyTorch's NCDHW; child names follow `livseg_jax.models.names` so the name table in
`livseg_jax.interop.mapping` maps them. The twins (`torch_models.py` for the paper's family,
`torch_<network>.py` for the comparison networks) import these units; `torch_models.py` imports
the twins, so this module is what keeps that one-way. Imports torch at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from livseg_jax.models import names
from livseg_jax.models.layers import BN_EPSILON
from livseg_jax.models.layers import BN_MOMENTUM as FLAX_BN_MOMENTUM

BN_MOMENTUM = round(1.0 - FLAX_BN_MOMENTUM, 12)  # PyTorch weighs the new batch statistic, Flax the old average


def activation_module(name: str) -> nn.Module:
    """Returns the torch activation module matching `livseg_jax.models.layers.activation_fn(name)`."""
    table = {
        "relu": nn.ReLU,
        "silu": nn.SiLU,
        "gelu": nn.GELU,  # exact (erf), as the Flax side
        "leaky_relu": lambda: nn.LeakyReLU(0.01),
        "elu": nn.ELU,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


def batch_norm3d(channels: int) -> nn.BatchNorm3d:
    """Returns the project's BatchNorm3d (momentum 0.1, eps 1e-5)."""
    return nn.BatchNorm3d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)


class ChannelAffine(nn.Module):
    """Per-channel `x * weight + bias` on (B, C, ...): the deploy form of a lone BatchNorm."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class ConvBN(nn.Module):
    """Conv3d (no bias) -> BatchNorm3d [-> act]; in deploy form one Conv3d with bias."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1,
                 act: str | None = None, deploy: bool = False, dilation: int = 1):
        super().__init__()
        # kernel == stride is the "VALID" down-sampling; odd kernels pad dilation * (kernel // 2).
        padding = 0 if kernel == stride else dilation * (kernel // 2)
        conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=deploy)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.add_module(names.CONV, conv)
        self.add_module(names.BN, None if deploy else batch_norm3d(c_out))
        self.act = activation_module(act) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self, names.CONV)(x)
        bn = getattr(self, names.BN)
        if bn is not None:
            y = bn(y)
        return self.act(y)


class RepConv3d(nn.Module):
    """act(BN(conv3x3x3 x) + BN(conv1x1x1 x) + BN(x)); deploy form: act(conv3x3x3 x + b)."""

    def __init__(self, channels: int, act: str, deploy: bool = False):
        super().__init__()
        self.act = activation_module(act)
        if deploy:
            self.add_module(names.CONV, nn.Conv3d(channels, channels, 3, padding=1, bias=True))
        else:
            self.add_module(names.REP_DENSE, ConvBN(channels, channels, 3))
            self.add_module(names.REP_POINT, ConvBN(channels, channels, 1))
            self.add_module(names.REP_IDENTITY, batch_norm3d(channels))
        self.deploy = deploy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(getattr(self, names.CONV)(x))
        dense, point, identity = (getattr(self, n) for n in (names.REP_DENSE, names.REP_POINT, names.REP_IDENTITY))
        return self.act(dense(x) + point(x) + identity(x))


class ELANResBlock(nn.Module):
    """ELAN residual block (SPEC 1.3): (B, C_in, D, H, W) -> (B, c_out, D, H, W)."""

    def __init__(self, c_in: int, c_out: int, act: str, n_rep: int = 2, deploy: bool = False):
        super().__init__()
        hidden = max(c_out // 2, 1)
        self.reduce_a = ConvBN(c_in, hidden, 1, act=act, deploy=deploy)
        self.reduce_b = ConvBN(c_in, hidden, 1, act=act, deploy=deploy)
        self.n_rep = n_rep
        for i in range(n_rep):
            self.add_module(f"rep{i}", RepConv3d(hidden, act, deploy))
        self.fuse = ConvBN(hidden * (n_rep + 2), c_out, 1, deploy=deploy)
        self.shortcut = None if c_in == c_out else ConvBN(c_in, c_out, 1, deploy=deploy)
        self.act = activation_module(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.reduce_a(x)
        branches = [self.reduce_b(x)]
        for i in range(self.n_rep):
            branches.append(getattr(self, f"rep{i}")(branches[-1]))
        y = self.fuse(torch.cat(branches[::-1] + [a], dim=1))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.act(y + shortcut)


class DoubleConv(nn.Module):
    """Two Conv3x3x3 -> BN -> act: (B, C_in, D, H, W) -> (B, c_out, D, H, W)."""

    def __init__(self, c_in: int, c_out: int, act: str, deploy: bool = False):
        super().__init__()
        self.conv0 = ConvBN(c_in, c_out, 3, act=act, deploy=deploy)
        self.conv1 = ConvBN(c_out, c_out, 3, act=act, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.conv0(x))


class TwinNetwork(nn.Module):
    """What every network twin's constructor shares: `hparams` (its arguments, from which the
    deploy form is rebuilt), the number of resolution levels, deep supervision and the deploy flag."""

    def __init__(self, features: Sequence[int], num_classes: int, deep_supervision: bool, deploy: bool,
                 in_channels: int, **extra):
        super().__init__()
        self.hparams = dict(features=tuple(features), num_classes=num_classes, deep_supervision=deep_supervision,
                            deploy=deploy, in_channels=in_channels, **extra)
        self.levels = len(features)
        self.deep_supervision, self.deploy = deep_supervision, deploy


def heads_forward(model: nn.Module, decoded: Sequence[torch.Tensor], out_size: tuple[int, ...],
                  all_heads: bool) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Returns the output of `model`'s heads `head<i>` (ids `model.head_ids`, coarse to fine): every twin's heads."""
    n = len(decoded)
    every = all_heads or (model.training and model.deep_supervision)
    logits = []
    for i in (i for i in model.head_ids if every or i == n - 1):
        y = getattr(model, f"{names.HEAD}{i}")(decoded[i])
        if tuple(y.shape[2:]) != out_size:
            y = F.interpolate(y, size=out_size, mode="trilinear", align_corners=False)
        logits.append(y)
    return tuple(logits) if (model.training or all_heads) else logits[-1]


def add_heads(model: nn.Module, head_widths: Sequence[int], num_classes: int, deploy: bool,
              kernel: tuple[int, int, int] = (1, 1, 1)) -> None:
    """Adds the `head<i>` convolutions on decoder outputs of `head_widths` channels (coarse to fine)
    to `model` and sets `model.head_ids`; the deploy form keeps the finest head alone."""
    n = len(head_widths)
    model.head_ids = [n - 1] if deploy else list(range(n))
    for i in model.head_ids:
        model.add_module(f"{names.HEAD}{i}", nn.Conv3d(head_widths[i], num_classes, kernel,
                                                       padding=tuple(k // 2 for k in kernel)))


def add_unet_decoder(model: nn.Module, features: Sequence[int], make_block: Callable[[int, int], nn.Module],
                     num_classes: int, deploy: bool) -> None:
    """Adds a U-Net decoder to `model`, coarse to fine: per level s a learned 2x up-sampling `up<s>`
    and `dec<s>` = `make_block(2 * features[s], features[s])` on it and the skip, then the heads."""
    for s in reversed(range(len(features) - 1)):
        model.add_module(f"{names.UP}{s}", nn.ConvTranspose3d(features[s + 1], features[s], 2, stride=2))
        model.add_module(f"dec{s}", make_block(2 * features[s], features[s]))
    # head i sits on the i-th decoder output, coarse to fine: dec{levels-2-i}.
    add_heads(model, features[-2::-1], num_classes, deploy)


def unet_decoder_forward(model: nn.Module, x: torch.Tensor, skips: Sequence[torch.Tensor], out_size: tuple[int, ...],
                         all_heads: bool) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Returns the heads' output (`heads_forward`) of the decoder `add_unet_decoder` built, run
    from the bottleneck output `x` with the encoder's `skips` (fine to coarse)."""
    decoded = []
    for s in reversed(range(len(skips))):
        x = getattr(model, f"dec{s}")(torch.cat([getattr(model, f"{names.UP}{s}")(x), skips[s]], dim=1))
        decoded.append(x)
    return heads_forward(model, decoded, out_size, all_heads)


def checked_size(x: torch.Tensor, levels: int) -> tuple[int, ...]:
    """Returns the (D, H, W) of a (B, C, D, H, W) input, refusing one that cannot pass the
    down-samplings of `levels` levels."""
    factor = 2 ** (levels - 1)
    if x.ndim != 5 or any(size % factor for size in x.shape[2:]):
        raise ValueError(f"expected (B, C, D, H, W) divisible by {factor}, got {tuple(x.shape)}")
    return tuple(x.shape[2:])
