"""RepConv3d and the ELANResBlock (SPEC 1.3): ELAN-style chained 3x3x3 convolutions whose
outputs are all fused by a 1x1x1 convolution, inside a residual connection.

RepConv3d trains three parallel branches (3x3x3 conv + BN, 1x1x1 conv + BN, identity BN) and is
re-parameterised for deployment into one 3x3x3 convolution with bias
(`livseg_jax.models.reparam.fold_repconv`).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from livseg_jax.models.layers import ConvBN, Dtype, batch_norm, conv_init, make_conv

Array = jax.Array


class RepConv3d(nn.Module):
    """Structurally re-parameterisable 3x3x3 convolution, channels preserved: (B,D,H,W,C) -> same."""

    act: Callable[[Array], Array]
    dtype: Dtype = jnp.float32
    deploy: bool = False
    pointwise_impl: str = "conv"
    dense_pack_channels: int = 0

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        if self.deploy:
            y = make_conv("conv", c, (3, 3, 3), None, True, conv_init, self.dtype, "conv",
                          dense_pack_channels=self.dense_pack_channels)(x)
            return self.act(y)
        dense = ConvBN(c, (3, 3, 3), dtype=self.dtype, dense_pack_channels=self.dense_pack_channels,
                       name="dense")(x, train)
        point = ConvBN(c, (1, 1, 1), dtype=self.dtype, pointwise_impl=self.pointwise_impl, name="point")(x, train)
        identity = batch_norm(train, self.dtype, name="identity")(x)
        return self.act(dense + point + identity)


class ELANResBlock(nn.Module):
    """ELAN residual block: (B, D, H, W, C_in) -> (B, D, H, W, features)."""

    features: int
    act: Callable[[Array], Array]
    n_rep: int = 2
    dtype: Dtype = jnp.float32
    deploy: bool = False
    pointwise_impl: str = "conv"
    dense_pack_channels: int = 0

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        hidden = max(self.features // 2, 1)
        unit = lambda f, k, act, name: ConvBN(  # noqa: E731
            f, k, act=act, dtype=self.dtype, deploy=self.deploy, pointwise_impl=self.pointwise_impl, name=name
        )
        a = unit(hidden, (1, 1, 1), self.act, "reduce_a")(x, train)
        b = unit(hidden, (1, 1, 1), self.act, "reduce_b")(x, train)
        branches = [b]
        for i in range(self.n_rep):
            branches.append(
                RepConv3d(self.act, dtype=self.dtype, deploy=self.deploy, pointwise_impl=self.pointwise_impl,
                          dense_pack_channels=self.dense_pack_channels, name=f"rep{i}")(
                    branches[-1], train
                )
            )
        # Deepest first, as in SPEC 1.3: concat[r2, r1, b, a].
        fused = jnp.concatenate(branches[::-1] + [a], axis=-1)
        y = unit(self.features, (1, 1, 1), None, "fuse")(fused, train)
        if x.shape[-1] == self.features:
            shortcut = x
        else:
            shortcut = unit(self.features, (1, 1, 1), None, "shortcut")(x, train)
        return self.act(y + shortcut)


class DoubleConv(nn.Module):
    """Plain U-Net block: two Conv3x3x3 -> BN -> act, (B,D,H,W,C_in) -> (B,D,H,W,features)."""

    features: int
    act: Callable[[Array], Array]
    dtype: Dtype = jnp.float32
    deploy: bool = False
    dense_pack_channels: int = 0

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i in range(2):
            x = ConvBN(
                self.features, (3, 3, 3), act=self.act, dtype=self.dtype, deploy=self.deploy,
                dense_pack_channels=self.dense_pack_channels, name=f"conv{i}",
            )(x, train)
        return x
