"""Every network `build_model` can make, by `model.name`, and the helpers that initialise one.

A network is a Flax module with the `UNet3D` interface: fields `features` (one width per
resolution level; a patch must divide by 2 ** (len(features) - 1)), `num_classes`,
`deep_supervision` and `layers` (a `Layers`, which also says whether it is the deploy form);
`__call__(x (B, D, H, W, C), train)` (in the axial form, `model.spatial_dims = 2`, the network
folds the slices into the batch and runs 2D layers, `models/layers.py`) returns, in training, a
tuple of logit maps at the input size ordered coarse to fine (one for networks without deep
supervision) and, in evaluation, the finest map alone. Heads are named `head<i>` and the
re-parameterisation folds every `ConvBN` and BatchNorm (`models/names.py`), so training,
validation, prediction, conversion and the summary work for every network of `NETWORKS` alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from livseg_jax.models.attention_unet import attention_unet_from_config
from livseg_jax.models.forms import resolve_dtype, resolve_forms
from livseg_jax.models.layers import Layers
from livseg_jax.models.r2unet import r2unet_from_config
from livseg_jax.models.resunet import resunet_from_config
from livseg_jax.models.resunet_pp import resunet_pp_from_config
from livseg_jax.models.riunet import riunet_from_config
from livseg_jax.models.unet import VARIANTS, unet_from_config
from livseg_jax.models.unet3plus import unet3plus_from_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.name -> constructor(model section, layers). The paper's family (SPEC 1.2) first; the
# comparison networks of SPEC 1.5 are added below it.
NETWORKS: dict[str, Callable[[ml_collections.ConfigDict, Layers], nn.Module]] = {
    **{name: unet_from_config for name in VARIANTS},
    "attention_unet": attention_unet_from_config,
    "resunet": resunet_from_config,
    "unet3plus": unet3plus_from_config,
    "riunet": riunet_from_config,
    "r2unet": r2unet_from_config,
    "resunet_pp": resunet_pp_from_config,
}


def build_model(model_config: ml_collections.ConfigDict, deploy: bool | None = None,
                backend: str | None = None) -> nn.Module:
    """Returns the network named by `model_config.name` (deploy form if asked).

    Computation forms and the compute dtype left to the backend ("auto", the default) are resolved for `backend`
    (default: JAX's default backend; see `livseg_jax.models.forms`).
    """
    name = model_config.name
    if name not in NETWORKS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(NETWORKS)}")
    backend = jax.default_backend() if backend is None else backend
    dtype = resolve_dtype(model_config, backend)
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be 'auto' or one of {sorted(DTYPES)}, got {model_config.dtype!r}")
    forms = resolve_forms(model_config, backend)
    layers = Layers(dtype=DTYPES[dtype], deploy=model_config.deploy if deploy is None else deploy,
                    spatial_dims=model_config.get("spatial_dims", 3), **forms)
    return NETWORKS[name](model_config, layers)


def variable_shapes(model: nn.Module, patch_shape: Sequence[int] | None = None, batch: int = 1,
                    in_channels: int = 1) -> dict:
    """Returns the ShapeDtypeStruct tree `{"params"[, "batch_stats"]}` of `model`'s variables.

    Nothing is computed (`jax.eval_shape`). Parameter shapes do not depend on the input size:
    `patch_shape=None` uses the smallest (D, H, W) the down-samplings allow.
    """
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), patch_shape, batch, in_channels))


def init_variables(model: nn.Module, rng: jax.Array, patch_shape: Sequence[int] | None = None, batch: int = 1,
                   in_channels: int = 1, dropout_rng: jax.Array | None = None) -> dict:
    """Returns `{"params"[, "batch_stats"]}` of `model` initialised from `rng` at a (D, H, W) patch.

    The training form is initialised in training mode, the deploy form in evaluation mode.
    `patch_shape=None` uses the smallest patch the down-samplings allow (shapes do not depend on
    it); `dropout_rng` defaults to `rng`.
    """
    if patch_shape is None:
        patch_shape = (2 ** (len(model.features) - 1),) * 3
        if model.layers.axial:
            patch_shape = (1, *patch_shape[1:])
    x = jnp.zeros((batch, *patch_shape, in_channels), jnp.float32)
    rngs = {"params": rng, "dropout": rng if dropout_rng is None else dropout_rng}
    return jax.jit(model.init, static_argnames="train")(rngs, x, train=not model.layers.deploy)
