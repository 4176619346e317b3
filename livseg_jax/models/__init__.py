"""Model family: the U-Net skeleton, its blocks, and re-parameterisation."""

from livseg_jax.models.reparam import reparameterize
from livseg_jax.models.unet import (
    VARIANTS,
    UNet3D,
    build_model,
    check_patch_shape,
    init_variables,
    variable_shapes,
)

__all__ = ["VARIANTS", "UNet3D", "build_model", "check_patch_shape", "init_variables",
           "reparameterize", "variable_shapes"]
