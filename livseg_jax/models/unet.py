"""The 3D U-Net skeleton with deep supervision (SPEC 1.1) and the four variants of the paper's
ablation (SPEC 1.2), built from the `model` section of a config."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from livseg_jax.models.elanres import DoubleConv, ELANResBlock
from livseg_jax.models.layers import ConvBN, Dtype, Upsample2x, activation_fn, make_conv
from livseg_jax.models.msca import MSCABlock

Array = jax.Array

# name -> (block kind, uses MSCA)
VARIANTS: dict[str, tuple[str, bool]] = {
    "unet": ("double", False),
    "msca_unet": ("double", True),
    "elanres_unet": ("elanres", False),
    "elanres_msca_unet": ("elanres", True),
}
AXIS_NAMES = ("depth", "height", "width")


def check_patch_shape(shape: Sequence[int], num_levels: int) -> None:
    """Raises ValueError naming the axis when a (D, H, W) shape cannot pass the down-samplings."""
    factor = 2 ** (num_levels - 1)
    for name, size in zip(AXIS_NAMES, shape, strict=True):
        if size % factor:
            raise ValueError(
                f"patch {name} = {size} is not divisible by {factor} "
                f"({num_levels - 1} down-samplings by 2); use a multiple of {factor}"
            )


class UNet3D(nn.Module):
    """U-Net on (B, D, H, W, C_in) returning logits (B, D, H, W, num_classes).

    Training (`train=True`) returns a tuple of per-decoder-stage logit maps ordered coarse to
    fine, each resized (trilinear, half-pixel centres) to the input size; evaluation returns only
    the finest map. With `deep_supervision=False` training returns a 1-tuple.
    """

    features: Sequence[int] = (16, 32, 64, 128, 256)
    num_classes: int = 2
    block: str = "elanres"  # "double" or "elanres"
    msca_stages: Sequence[int] = (1, 2, 3, 4)
    msca_mode: str = "2d"
    depthwise_impl: str = "conv"
    pointwise_impl: str = "conv"
    dense_pack_channels: int = 0
    activation: str = "silu"
    n_rep: int = 2
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    deep_supervision: bool = True
    deploy: bool = False

    def _block(self, features: int, name: str) -> nn.Module:
        act = activation_fn(self.activation)
        if self.block == "elanres":
            return ELANResBlock(features, act, self.n_rep, self.dtype, self.deploy, self.pointwise_impl,
                                self.dense_pack_channels, name=name)
        if self.block == "double":
            return DoubleConv(features, act, self.dtype, self.deploy, self.dense_pack_channels, name=name)
        raise ValueError(f"unknown block kind {self.block!r}")

    def _msca(self, stage: int, x: Array, train: bool) -> Array:
        if stage not in self.msca_stages:
            return x
        return MSCABlock(self.msca_mode, dtype=self.dtype, deploy=self.deploy,
                         depthwise_impl=self.depthwise_impl, pointwise_impl=self.pointwise_impl,
                         name=f"msca{stage}")(x, train)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | tuple[Array, ...]:
        if x.ndim != 5:
            raise ValueError(f"expected input (B, D, H, W, C), got shape {x.shape}")
        levels = len(self.features)
        check_patch_shape(x.shape[1:4], levels)
        act = activation_fn(self.activation)
        out_shape = x.shape[:4]
        x = x.astype(self.dtype)

        skips = []
        for s in range(levels - 1):
            x = self._block(self.features[s], f"enc{s}")(x, train)
            x = self._msca(s, x, train)
            skips.append(x)
            x = ConvBN(self.features[s + 1], (2, 2, 2), strides=(2, 2, 2), padding="VALID",
                       act=act, dtype=self.dtype, deploy=self.deploy, name=f"down{s}")(x, train)
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = self._block(self.features[-1], "bottleneck")(x, train)
        x = self._msca(levels - 1, x, train)

        decoded = []
        for s in reversed(range(levels - 1)):
            x = Upsample2x(self.features[s], dtype=self.dtype, name=f"up{s}")(x)
            x = jnp.concatenate([x, skips[s]], axis=-1)
            x = self._block(self.features[s], f"dec{s}")(x, train)
            decoded.append(x)  # coarse to fine

        n = len(decoded)
        supervised = range(n) if (train and self.deep_supervision) else [n - 1]
        logits = []
        for i in supervised:
            head = make_conv(self.pointwise_impl, self.num_classes, (1, 1, 1), None, True,
                             nn.initializers.lecun_normal(), self.dtype, f"head{i}")
            y = head(decoded[i]).astype(jnp.float32)
            if y.shape[1:4] != tuple(out_shape[1:4]):
                y = jax.image.resize(y, out_shape + (self.num_classes,), method="trilinear")
            logits.append(y)
        return tuple(logits) if train else logits[-1]


def build_model(model_config: ml_collections.ConfigDict, deploy: bool | None = None) -> UNet3D:
    """Returns the UNet3D variant named by `model_config.name` (deploy form if asked)."""
    name = model_config.name
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(VARIANTS)}")
    block, uses_msca = VARIANTS[name]
    pack = model_config.get("dense_pack_channels", 0)
    if not isinstance(pack, int) or isinstance(pack, bool) or pack < 0:
        raise ValueError(f"model.dense_pack_channels must be an integer >= 0 (0: off), got {pack!r}")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if model_config.dtype not in dtypes:
        raise ValueError(f"model.dtype must be one of {sorted(dtypes)}, got {model_config.dtype!r}")
    return UNet3D(
        features=tuple(model_config.features),
        num_classes=model_config.num_classes,
        block=block,
        msca_stages=tuple(model_config.msca_stages) if uses_msca else (),
        msca_mode=model_config.msca_mode,
        depthwise_impl=model_config.get("depthwise_impl", "conv"),
        pointwise_impl=model_config.get("pointwise_impl", "conv"),
        dense_pack_channels=pack,
        activation=model_config.activation,
        n_rep=model_config.n_rep,
        dropout=model_config.dropout,
        dtype=dtypes[model_config.dtype],
        deep_supervision=model_config.deep_supervision,
        deploy=model_config.deploy if deploy is None else deploy,
    )


def init_variables(model: UNet3D, rng: jax.Array, patch_shape: Sequence[int], in_channels: int = 1):
    """Returns `{"params", "batch_stats"}` for `model` at a (D, H, W) patch, batch of 1."""
    x = jnp.zeros((1, *patch_shape, in_channels), jnp.float32)
    init = jax.jit(model.init, static_argnames="train")
    return init({"params": rng, "dropout": rng}, x, train=not model.deploy)
