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

from livseg_jax.models import names
from livseg_jax.models.layers import ConvBN, Layers, conv_init

Array = jax.Array


class RepConv3d(nn.Module):
    """Structurally re-parameterisable 3x3x3 convolution, channels preserved: (B,D,H,W,C) -> same."""

    act: Callable[[Array], Array]
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        if self.layers.deploy:
            return self.act(self.layers.conv(c, (3, 3, 3), kernel_init=conv_init, name=names.CONV)(x))
        dense = ConvBN(c, (3, 3, 3), layers=self.layers, name=names.REP_DENSE)(x, train)
        point = ConvBN(c, (1, 1, 1), layers=self.layers, name=names.REP_POINT)(x, train)
        identity = self.layers.batch_norm(train, name=names.REP_IDENTITY)(x)
        return self.act(dense + point + identity)


class ELANResBlock(nn.Module):
    """ELAN residual block: (B, D, H, W, C_in) -> (B, D, H, W, features)."""

    features: int
    act: Callable[[Array], Array]
    n_rep: int = 2
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        hidden = max(self.features // 2, 1)

        def unit(features: int, act: Callable[[Array], Array] | None, name: str) -> ConvBN:
            return ConvBN(features, (1, 1, 1), act=act, layers=self.layers, name=name)

        a = unit(hidden, self.act, "reduce_a")(x, train)
        b = unit(hidden, self.act, "reduce_b")(x, train)
        branches = [b]
        for i in range(self.n_rep):
            branches.append(RepConv3d(self.act, self.layers, name=f"rep{i}")(branches[-1], train))
        # Deepest first, as in SPEC 1.3: concat[r2, r1, b, a].
        fused = jnp.concatenate(branches[::-1] + [a], axis=-1)
        y = unit(self.features, None, "fuse")(fused, train)
        if x.shape[-1] == self.features:
            shortcut = x
        else:
            shortcut = unit(self.features, None, "shortcut")(x, train)
        return self.act(y + shortcut)


class DoubleConv(nn.Module):
    """Plain U-Net block: two Conv3x3x3 -> BN -> act, (B,D,H,W,C_in) -> (B,D,H,W,features)."""

    features: int
    act: Callable[[Array], Array]
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i in range(2):
            x = ConvBN(self.features, (3, 3, 3), act=self.act, layers=self.layers, name=f"conv{i}")(x, train)
        return x
