"""Computation forms: chosen by the backend unless the config pins them."""

import jax.numpy as jnp
import pytest

from livseg_jax.config import model_config
from livseg_jax.models import build_model
from livseg_jax.models.forms import (
    GPU_FORMS,
    REFERENCE_FORMS,
    check_training_forms,
    may_run_gpu_forms,
    resolve_dtype,
    resolve_forms,
)
from livseg_jax.models.layers import Layers


def test_auto_is_the_gpu_forms_on_gpus_and_the_reference_forms_elsewhere():
    config = model_config()  # the defaults leave every form to the backend
    assert resolve_forms(config, "gpu") == GPU_FORMS == {
        "depthwise_impl": "shift", "pointwise_impl": "einsum", "dense_pack_channels": 32,
        "batch_norm_impl": "two_stage"}
    for backend in ("cpu", "tpu"):
        assert resolve_forms(config, backend) == REFERENCE_FORMS == {
            "depthwise_impl": "conv", "pointwise_impl": "conv", "dense_pack_channels": 0,
            "batch_norm_impl": "flax"}


def test_a_pinned_form_is_kept_on_every_backend():
    config = model_config()
    config.update(depthwise_impl="conv", dense_pack_channels=0)
    assert resolve_forms(config, "gpu") == {"depthwise_impl": "conv", "pointwise_impl": "einsum",
                                            "dense_pack_channels": 0, "batch_norm_impl": "two_stage"}
    config.update(pointwise_impl="einsum", dense_pack_channels=16, batch_norm_impl="two_stage")
    assert resolve_forms(config, "cpu") == {"depthwise_impl": "conv", "pointwise_impl": "einsum",
                                            "dense_pack_channels": 16, "batch_norm_impl": "two_stage"}
    # A config saved before the keys existed (or with "auto" spelled out) leaves them to the backend.
    assert resolve_forms({"dense_pack_channels": "auto"}, "gpu") == GPU_FORMS


@pytest.mark.parametrize("backend,forms,dtype",
                         [("gpu", GPU_FORMS, jnp.bfloat16), ("cpu", REFERENCE_FORMS, jnp.float32)])
def test_build_model_resolves_auto_for_the_backend(backend, forms, dtype):
    model = build_model(model_config(), backend=backend)
    assert model.layers == Layers(dtype=dtype, **forms)


def test_auto_dtype_is_bfloat16_on_gpus_only_and_a_pinned_dtype_is_kept():
    config = model_config()
    assert config.dtype == "auto"
    assert [resolve_dtype(config, b) for b in ("gpu", "cpu", "tpu")] == ["bfloat16", "float32", "float32"]
    assert resolve_dtype({}, "gpu") == "bfloat16"  # a config saved before the key was "auto"
    config.dtype = "float32"
    assert resolve_dtype(config, "gpu") == "float32"
    assert build_model(config, backend="gpu").layers.dtype == jnp.float32
    config.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype"):
        build_model(config, backend="gpu")


def test_the_bf16_guard_sees_through_auto_dtype():
    config = model_config()
    config.pointwise_impl = "conv"
    with pytest.raises(ValueError, match="NaN"):
        check_training_forms(config, "gpu")  # dtype "auto" is bfloat16 there
    check_training_forms(config, "cpu")
    config.dtype = "float32"
    check_training_forms(config, "gpu")


def test_build_model_defaults_to_the_running_backend():
    import jax

    assert build_model(model_config()).layers == build_model(model_config(), backend=jax.default_backend()).layers


def test_bad_pinned_values_are_refused_on_every_backend():
    for backend in ("gpu", "cpu"):
        for key, value in (("pointwise_impl", "gemm"), ("depthwise_impl", "fft"), ("dense_pack_channels", -8),
                           ("batch_norm_impl", "welford")):
            config = model_config()
            config[key] = value
            with pytest.raises(ValueError, match=key):
                build_model(config, backend=backend)


def test_only_the_reference_forms_pinned_run_no_gpu_form():
    config = model_config()
    assert may_run_gpu_forms(config)  # "auto": the GPU forms on a GPU
    config.update(REFERENCE_FORMS)
    assert not may_run_gpu_forms(config)
    config.dense_pack_channels = 16
    assert may_run_gpu_forms(config)
    # The NHWC flag follows the convolutions' forms only: BatchNorm's form does not ask for it,
    # and a config saved before batch_norm_impl existed, pinned to the reference, stays as it was.
    config.update(REFERENCE_FORMS)
    config.batch_norm_impl = "two_stage"
    assert not may_run_gpu_forms(config)
    assert not may_run_gpu_forms({k: REFERENCE_FORMS[k] for k in ("depthwise_impl", "pointwise_impl",
                                                                  "dense_pack_channels")})


def test_bf16_training_with_conv_1x1s_is_refused_on_gpus_only():
    config = model_config()
    config.dtype, config.pointwise_impl = "bfloat16", "conv"
    with pytest.raises(ValueError, match="pointwise_impl='conv' with model.dtype='bfloat16' on a GPU"):
        check_training_forms(config, "gpu")
    check_training_forms(config, "cpu")  # no kernel engine of that kind elsewhere
    config.pointwise_impl = "auto"  # the GPU forms: einsum 1x1s
    check_training_forms(config, "gpu")
    config.pointwise_impl, config.dtype = "conv", "float32"
    check_training_forms(config, "gpu")
