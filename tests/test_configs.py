"""Stage configs: presets, variants, and clear errors."""

import importlib.util
import pathlib

import pytest

from livseg_jax.config import MODEL_NAMES
from livseg_jax.models import check_patch_shape
from livseg_jax.models.forms import resolve_forms

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(stage):
    spec = importlib.util.spec_from_file_location(f"cfg_{stage}", CONFIGS / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


@pytest.mark.parametrize("stage", ["liver", "tumor"])
def test_demo_and_paper_presets_differ_and_patches_fit_the_network(stage):
    get_config = load(stage)
    demo, paper = get_config(""), get_config("paper")
    assert demo.stage == paper.stage == stage
    assert tuple(paper.model.features) == (16, 32, 64, 128, 256)
    assert paper.optim.learning_rate == pytest.approx(1e-4)  # the paper's Adam rate
    assert max(demo.model.features) < max(paper.model.features)
    # Presets are science only: computation forms are left to the backend, which gives the paper
    # run the GPU-fast forms (same parameters, tests/test_models.py) and a CPU demo the reference
    # forms, which compile faster there; the XLA flags come from the forms, not from the preset.
    for config in (demo, paper):
        assert (config.model.depthwise_impl, config.model.pointwise_impl, config.model.batch_norm_impl) == \
            ("auto", "auto", "auto")
        assert config.model.dense_pack_channels is None
        assert config.train.xla_flags == ""
    assert resolve_forms(paper.model, "gpu") == {
        "depthwise_impl": "shift", "pointwise_impl": "einsum", "dense_pack_channels": 32,
        "batch_norm_impl": "two_stage"}
    assert resolve_forms(demo.model, "cpu") == {
        "depthwise_impl": "conv", "pointwise_impl": "conv", "dense_pack_channels": 0, "batch_norm_impl": "flax"}
    for config in (demo, paper):
        check_patch_shape(tuple(config.data.patch_size), len(config.model.features))
        assert config.model.name == "elanres_msca_unet"


@pytest.mark.parametrize("variant", MODEL_NAMES)
def test_variant_argument_selects_the_model(variant):
    assert load("tumor")(f"paper,{variant}").model.name == variant


def test_unknown_config_argument_is_an_error_naming_the_file():
    with pytest.raises(ValueError, match=r"configs/liver.py: unknown argument\(s\) \['bogus'\]"):
        load("liver")("paper,bogus")


def test_every_config_name_is_a_network_with_a_torch_twin():
    from livseg_jax.models import NETWORKS

    assert set(MODEL_NAMES) == set(NETWORKS)
    pytest.importorskip("torch")
    from livseg_jax.interop.torch_models import TORCH_NETWORKS

    assert set(TORCH_NETWORKS) == set(NETWORKS)


@pytest.mark.parametrize("stage", ["liver", "tumor"])
def test_fewshot_preset_is_the_paper_run_with_the_real_ct_benchmarks_recipe(stage):
    """`:fewshot` = `:paper` + target spacing + device augmentation + the benchmark's rate, and it
    passes the start-up config checks."""
    from livseg_jax.config_checks import validate_config

    get_config = load(stage)
    paper, fewshot = get_config("paper"), get_config("fewshot,unet")
    assert tuple(fewshot.data.patch_size) == tuple(paper.data.patch_size)
    assert tuple(fewshot.model.features) == tuple(paper.model.features)
    assert fewshot.model.name == "unet"
    assert (fewshot.preprocess.spacing_mode, tuple(fewshot.preprocess.target_spacing)) == ("target", (1.6, 1.5, 1.5))
    assert fewshot.data.augment.device and not paper.data.augment.device
    assert fewshot.optim.learning_rate == pytest.approx(1e-3)
    assert paper.preprocess.spacing_mode == "fixed_factor"
    validate_config(fewshot)
