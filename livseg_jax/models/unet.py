"""The 3D U-Net skeleton with deep supervision (SPEC 1.1) and the four variants of the paper's
ablation (SPEC 1.2), built from the `model` section of a config."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from livseg_jax.models import names
from livseg_jax.models.elanres import DoubleConv, ELANResBlock
from livseg_jax.models.layers import ConvBN, Layers, activation_fn
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


def check_patch_shape(shape: Sequence[int], num_levels: int, spatial_dims: int = 3) -> None:
    """Raises ValueError naming the axis when a (D, H, W) shape cannot pass the down-samplings
    (the axial form, `spatial_dims=2`, never pools the depth axis: any depth passes)."""
    factor = 2 ** (num_levels - 1)
    for axis, (name, size) in enumerate(zip(AXIS_NAMES, shape, strict=True)):
        if spatial_dims == 2 and axis == 0:
            continue
        if size % factor:
            raise ValueError(
                f"patch {name} = {size} is not divisible by {factor} "
                f"({num_levels - 1} down-samplings by 2); use a multiple of {factor}"
            )


def deep_supervision_heads(decoded: Sequence[Array], out_shape: Sequence[int], num_classes: int, layers: Layers,
                           train: bool, deep_supervision: bool) -> Array | tuple[Array, ...]:
    """Returns the 1x1x1 `head<i>` logits of decoder outputs (coarse to fine), every network's heads.

    Training: every head (or the finest alone without deep supervision) as a tuple, each resized
    (trilinear, half-pixel centres) to `out_shape` (B, D, H, W); evaluation: the finest map.
    Must be called from inside a compact module (the heads are its children).
    """
    n = len(decoded)
    supervised = range(n) if (train and deep_supervision) else [n - 1]
    heads = [layers.conv(num_classes, (1, 1, 1), name=f"{names.HEAD}{i}")(decoded[i]) for i in supervised]
    return network_output(heads, out_shape, layers, train)


def network_output(heads: Sequence[Array], out_shape: Sequence[int], layers: Layers,
                   train: bool) -> Array | tuple[Array, ...]:
    """Returns a network's output from its head logits in the network layout (coarse to fine):
    each as float32 (B, D, H, W, K), resized to the input's `out_shape` (B, D, H, W); the tuple in
    training, the finest map in evaluation."""
    size = layers.network_size(out_shape)
    logits = []
    for y in heads:
        y = y.astype(jnp.float32)
        if tuple(y.shape[1:-1]) != size:
            y = layers.resize(y, size)
        logits.append(layers.unfold(y, out_shape))
    return tuple(logits) if train else logits[-1]


class SegmentationNetwork(nn.Module):
    """What every network shares (the protocol in `models/build.py`): its common fields, the deploy
    flag and the checked input. Networks subclass it and add their own fields."""

    features: Sequence[int] = (16, 32, 64, 128, 256)
    num_classes: int = 2
    deep_supervision: bool = True
    layers: Layers = Layers()  # dtype, computation forms, training or deploy form

    @property
    def deploy(self) -> bool:
        """Returns whether this is the re-parameterised (deploy) form."""
        return self.layers.deploy

    def checked_input(self, x: Array, levels: int | None = None) -> tuple[Array, tuple[int, ...]]:
        """Returns (x in the compute dtype and the network layout (`Layers.fold`), its (B, D, H, W))
        after checking that x is (B, D, H, W, C) and that its patch passes the down-samplings of
        `levels` levels (default: one per width)."""
        if x.ndim != 5:
            raise ValueError(f"expected input (B, D, H, W, C), got shape {x.shape}")
        check_patch_shape(x.shape[1:4], len(self.features) if levels is None else levels, self.layers.spatial_dims)
        return self.layers.fold(x.astype(self.layers.dtype)), tuple(x.shape[:4])


class UNet3D(SegmentationNetwork):
    """U-Net on (B, D, H, W, C_in) returning logits (B, D, H, W, num_classes).

    Training (`train=True`) returns a tuple of per-decoder-stage logit maps ordered coarse to
    fine, each resized (trilinear, half-pixel centres) to the input size; evaluation returns only
    the finest map. With `deep_supervision=False` training returns a 1-tuple.
    """

    block: str = "elanres"  # "double" or "elanres"
    msca_stages: Sequence[int] = (1, 2, 3, 4)
    msca_mode: str = "2d"
    activation: str = "silu"
    n_rep: int = 2
    dropout: float = 0.0

    def _block(self, features: int, name: str) -> nn.Module:
        act = activation_fn(self.activation)
        if self.block == "elanres":
            return ELANResBlock(features, act, self.n_rep, self.layers, name=name)
        if self.block == "double":
            return DoubleConv(features, act, self.layers, name=name)
        raise ValueError(f"unknown block kind {self.block!r}")

    def _msca(self, stage: int, x: Array, train: bool) -> Array:
        if stage not in self.msca_stages:
            return x
        return MSCABlock(self.msca_mode, layers=self.layers, name=f"msca{stage}")(x, train)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | tuple[Array, ...]:
        x, out_shape = self.checked_input(x)
        levels = len(self.features)
        act = activation_fn(self.activation)

        skips = []
        for s in range(levels - 1):
            x = self._block(self.features[s], f"enc{s}")(x, train)
            x = self._msca(s, x, train)
            skips.append(x)
            x = ConvBN(self.features[s + 1], (2, 2, 2), strides=(2, 2, 2), padding="VALID", act=act,
                       layers=self.layers, name=f"down{s}")(x, train)
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = self._block(self.features[-1], "bottleneck")(x, train)
        x = self._msca(levels - 1, x, train)

        decoded = []
        for s in reversed(range(levels - 1)):
            x = self.layers.upsample(self.features[s], name=f"{names.UP}{s}")(x)
            x = jnp.concatenate([x, skips[s]], axis=-1)
            x = self._block(self.features[s], f"dec{s}")(x, train)
            decoded.append(x)  # coarse to fine

        return deep_supervision_heads(decoded, out_shape, self.num_classes, self.layers, train,
                                      self.deep_supervision)


def unet_from_config(model_config: ml_collections.ConfigDict, layers: Layers) -> UNet3D:
    """Returns the `UNet3D` variant named by `model_config.name` (one of `VARIANTS`)."""
    block, uses_msca = VARIANTS[model_config.name]
    return UNet3D(
        features=tuple(model_config.features),
        num_classes=model_config.num_classes,
        block=block,
        msca_stages=tuple(model_config.msca_stages) if uses_msca else (),
        msca_mode=model_config.msca_mode,
        activation=model_config.activation,
        n_rep=model_config.n_rep,
        dropout=model_config.dropout,
        deep_supervision=model_config.deep_supervision,
        layers=layers,
    )
