"""Computation forms: how the same parameters are computed, chosen by the backend unless pinned.

Four model settings choose a form without changing the parameters or, beyond float rounding, the
outputs: `depthwise_impl`, `pointwise_impl`, `dense_pack_channels` (see `models/layers.py`) and
`batch_norm_impl` (`models/batch_norm.py`).
Each may be "auto" (`dense_pack_channels`: None), the default: the backend's fastest exact form
then applies, the GPU forms on GPUs (measured in docs/benchmarks.md) and the reference forms
elsewhere, which also compile fastest on a CPU. A value in the config pins the form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

AUTO = "auto"
# The fastest forms measured on GPUs, and the plain convolutions every other backend gets.
GPU_FORMS = {"depthwise_impl": "shift", "pointwise_impl": "einsum", "dense_pack_channels": 32,
             "batch_norm_impl": "two_stage"}
REFERENCE_FORMS = {"depthwise_impl": "conv", "pointwise_impl": "conv", "dense_pack_channels": 0,
                   "batch_norm_impl": "flax"}
FORM_KEYS = tuple(REFERENCE_FORMS)
# The forms of the convolutions, which evaluation runs too; BatchNorm's form is a training
# computation (evaluation always normalises with the running averages, as Flax does).
CONV_FORM_KEYS = ("depthwise_impl", "pointwise_impl", "dense_pack_channels")


def backend_forms(backend: str) -> dict[str, Any]:
    """Returns the forms "auto" stands for on `backend` ("gpu", "cpu", "tpu", ...)."""
    return dict(GPU_FORMS if backend == "gpu" else REFERENCE_FORMS)


# The compute dtype "auto" stands for: bfloat16 on GPUs (5,000 real-CT steps stayed finite and matched
# float32's validation Dice, docs/bf16_nan.md), float32 elsewhere (XLA:CPU has no fast bf16 convolutions).
GPU_DTYPE, REFERENCE_DTYPE = "bfloat16", "float32"


def resolve_dtype(model_config: Mapping[str, Any], backend: str) -> str:
    """Returns the compute dtype name of a model config on `backend`: "auto" (or absent) resolved, else as given."""
    value = model_config.get("dtype", AUTO)
    if is_auto(value):
        return GPU_DTYPE if backend == "gpu" else REFERENCE_DTYPE
    return value


def is_auto(value: Any) -> bool:
    """Returns True when a form setting leaves the choice to the backend ("auto" or None)."""
    return value is None or value == AUTO


def resolve_forms(model_config: Mapping[str, Any], backend: str,
                  keys: tuple[str, ...] = FORM_KEYS) -> dict[str, Any]:
    """Returns {key: form} of a model config on `backend` for `keys` (default: every form key).

    Settings left "auto" (or None, or absent) take the backend's forms; the others are kept as
    given, and `models.layers.Layers` validates them.
    """
    chosen = backend_forms(backend)
    return {key: chosen[key] if is_auto(model_config.get(key)) else model_config.get(key) for key in keys}


def may_run_gpu_forms(model_config: Mapping[str, Any]) -> bool:
    """Returns True when a model config runs a convolution form other than the reference on a GPU:
    one is left "auto" or pinned to a non-reference value (the forms the NHWC flag was measured with)."""
    return any(is_auto(model_config.get(key)) or model_config.get(key) != REFERENCE_FORMS[key]
               for key in CONV_FORM_KEYS)


def check_training_forms(model_config: Mapping[str, Any], backend: str) -> None:
    """Raises ValueError for a form known to corrupt training on `backend`.

    bf16 training with 1x1 convolutions as `lax.conv` on a GPU writes NaN into the kernels of
    those convolutions after a few steps, with or without state donation, and only into kernels
    whose gradient XLA computes with one cuDNN engine (convBackwardFilter, engine 62; see
    docs/bf16_nan.md and `experiments/bf16_nan.py`). The einsum form
    computes the same values without cuDNN. Prediction is unaffected (no kernel gradient).
    """
    forms = resolve_forms(model_config, backend)
    if backend == "gpu" and resolve_dtype(model_config, backend) == "bfloat16" and forms["pointwise_impl"] == "conv":
        raise ValueError(
            "model.pointwise_impl='conv' with model.dtype='bfloat16' on a GPU: known to write NaN into the "
            "1x1 convolution kernels during training (docs/bf16_nan.md); use "
            "model.pointwise_impl='einsum' (or 'auto') or model.dtype='float32'; model.dtype='auto' is bfloat16 "
            "on a GPU")
