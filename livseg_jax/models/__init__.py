"""Model family: the U-Net skeleton, its blocks, the comparison networks and re-parameterisation."""

from livseg_jax.models.build import NETWORKS, build_model, init_variables, variable_shapes
from livseg_jax.models.reparam import reparameterize
from livseg_jax.models.unet import VARIANTS, UNet3D, check_patch_shape

__all__ = ["NETWORKS", "VARIANTS", "UNet3D", "build_model", "check_patch_shape", "init_variables",
           "reparameterize", "variable_shapes"]
