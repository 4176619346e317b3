"""The sub-module names that code outside a block reads: the one table they depend on.

Blocks name these children with the constants below; re-parameterisation (`models/reparam.py`)
finds the units to fold by them; the PyTorch name table (`interop/mapping.py`) tells BatchNorms and
up-samplings apart by them, and the torch twins (`interop/torch_models.py`) spell them the same.
Every other name (`enc0`, `reduce_a`, `strip7_0`, ...) is copied verbatim by the name table, so
only the twins must match it. Checkpoints store these names: changing one changes their format.
"""

from __future__ import annotations

# Inside a ConvBN: its convolution and BatchNorm. The deploy form keeps CONV, with a bias.
CONV = "conv"
BN = "bn"

# Inside a RepConv3d: the three training branches. The deploy form is one CONV.
REP_DENSE = "dense"  # 3x3x3 ConvBN
REP_POINT = "point"  # 1x1x1 ConvBN
REP_IDENTITY = "identity"  # BatchNorm on the input

# Inside an MSCABlock: the BatchNorms without a convolution before them (deploy: per-channel affine).
MSCA_NORMS = ("norm1", "norm2")

# Inside a pre-activation unit (ResUNet++): the BatchNorm on the unit's input (deploy: affine).
PRE_NORM = "pre_bn"

# Prefixes of numbered modules of the U-Net: up0, up1, ...; head0, head1, ...
UP = "up"  # Upsample2x (a ConvTranspose3d in torch: its kernel axes differ from a conv's)
HEAD = "head"  # head i reads the i-th decoder output, coarse to fine; deploy keeps the finest

# A pre-activation residual unit's first BatchNorm (BN-act-conv; deploy: per-channel affine).
PREACT = "preact"

# BatchNorm-like leaves (scale/bias; torch weight/bias) end in one of these module names.
NORM_MODULES = (BN, REP_IDENTITY, *MSCA_NORMS, PREACT, PRE_NORM)
