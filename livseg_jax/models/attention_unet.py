"""3D Attention U-Net (SPEC 1.5): a U-Net whose skip connections pass through additive attention gates.

Follows Oktay, Schlemper, Le Folgoc, Lee, Heinrich, Misawa, Mori, McDonagh, Hammerla, Kainz,
Glocker & Rueckert (2018), "Attention U-Net: Learning Where to Look for the Pancreas" (MIDL 2018),
and its reference code (ozan-oktay/Attention-Gated-Networks, `unet_CT_single_att_dsv_3D` with
`GridAttentionBlock3D`, mode "concatenation"):

- encoder: per level a block of two Conv3x3x3-BN-ReLU (`DoubleConv`), then 2x2x2 max-pooling;
  the bottleneck is the same block; widths (16, 32, 64, 128, 256) (the paper's 64..1024 divided
  by its `feature_scale` 4), which are our default `model.features`;
- grid attention gate on every skip: the gating signal g is the coarser decoder level's output
  (for the deepest skip: the bottleneck through a 1x1x1 Conv-BN-ReLU, `gating`), on a grid half
  the skip's size. The skip x is brought onto g's grid by W_x = a 2x2x2 stride-2 convolution
  without bias (`theta`, the paper's "sub-sampling" of x; the code's default
  `sub_sample_factor=2`), g by W_g = a 1x1x1 convolution with bias (`phi`); both have
  `inter = skip width // 2` channels. q = psi(ReLU(W_x x + W_g g)) with psi a 1x1x1 convolution
  to one channel with bias, alpha = sigmoid(q), resampled trilinearly (half-pixel centres, as
  the heads; PyTorch's `align_corners=False`) to the skip's grid; the gate outputs
  W(alpha * x) with W a 1x1x1 Conv-BN (`project`), as the reference code;
- decoder: per level our learned 2x up-sampling (`up<s>`, ConvTranspose3d k=2 s=2; the paper's
  CT model up-samples trilinearly), concatenation with the gated skip, `DoubleConv`;
- deep supervision: the paper supervises every decoder level (its `dsv` maps, fused by a final
  1x1x1 convolution); here each decoder level has a 1x1x1 head `head<i>`, coarse to fine,
  resized to the input, trained with our deep-supervision loss like `UNet3D` (no fusion conv).

Activation: ReLU (the paper's), whatever `model.activation` says. Widths come from
`model.features` (one per level; a patch must divide by 2 ** (levels - 1)).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from livseg_jax.models import names
from livseg_jax.models.elanres import DoubleConv
from livseg_jax.models.layers import ConvBN, Layers, activation_fn, conv_init
from livseg_jax.models.unet import SegmentationNetwork, deep_supervision_heads

Array = jax.Array

ACTIVATION = "relu"  # the paper's
GATE_SUBSAMPLE = 2  # W_x's kernel and stride: the skip's grid / the gating grid


class AttentionGate(nn.Module):
    """Additive grid attention gate: skip x (B, D, H, W, C), gating g (B, D/2, H/2, W/2, C_g) -> W(alpha x).

    The coefficients alpha (B, D, H, W, 1), in [0, 1], are sown as `intermediates/coefficients`.
    """

    inter_features: int
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, g: Array, train: bool) -> Array:
        s = GATE_SUBSAMPLE
        theta = self.layers.conv(self.inter_features, (s, s, s), strides=(s, s, s), padding="VALID",
                                 use_bias=False, kernel_init=conv_init, name="theta")(x)
        phi = self.layers.conv(self.inter_features, (1, 1, 1), name="phi")(g)
        if theta.shape[1:-1] != phi.shape[1:-1]:
            raise ValueError(f"gating grid {phi.shape[1:-1]} is not the skip's {x.shape[1:-1]} / {s}")
        q = self.layers.conv(1, (1, 1, 1), name="psi")(nn.relu(theta + phi))
        alpha = nn.sigmoid(q)
        alpha = self.layers.resize(alpha, x.shape[1:-1]).astype(x.dtype)
        self.sow("intermediates", "coefficients", alpha)
        return ConvBN(x.shape[-1], (1, 1, 1), layers=self.layers, name="project")(alpha * x, train)


class AttentionUNet3D(SegmentationNetwork):
    """Attention U-Net on (B, D, H, W, C_in) returning logits (B, D, H, W, num_classes).

    Training returns the per-decoder-level logits coarse to fine at the input size (one with
    `deep_supervision=False`); evaluation returns the finest map alone.
    """

    activation: str = ACTIVATION

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | tuple[Array, ...]:
        x, out_shape = self.checked_input(x)
        levels = len(self.features)
        act = activation_fn(self.activation)

        skips = []
        for s in range(levels - 1):
            x = DoubleConv(self.features[s], act, self.layers, name=f"enc{s}")(x, train)
            skips.append(x)
            x = self.layers.max_pool(x, 2)
        x = DoubleConv(self.features[-1], act, self.layers, name="bottleneck")(x, train)
        g = ConvBN(self.features[-1], (1, 1, 1), act=act, layers=self.layers, name="gating")(x, train)

        decoded = []
        for s in reversed(range(levels - 1)):
            gated = AttentionGate(max(self.features[s] // 2, 1), self.layers, name=f"gate{s}")(skips[s], g, train)
            x = self.layers.upsample(self.features[s], name=f"{names.UP}{s}")(x)
            x = DoubleConv(self.features[s], act, self.layers, name=f"dec{s}")(
                jnp.concatenate([x, gated], axis=-1), train)
            decoded.append(x)  # coarse to fine
            g = x  # the next (finer) gate is gated by this level

        return deep_supervision_heads(decoded, out_shape, self.num_classes, self.layers, train,
                                      self.deep_supervision)


def attention_unet_from_config(model_config: ml_collections.ConfigDict, layers: Layers) -> AttentionUNet3D:
    """Returns the Attention U-Net with `model.features`, `num_classes`, `deep_supervision`."""
    return AttentionUNet3D(features=tuple(model_config.features), num_classes=model_config.num_classes,
                           deep_supervision=model_config.deep_supervision, layers=layers)
