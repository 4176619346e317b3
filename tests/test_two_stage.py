"""Two-stage pipeline: largest component, liver-box crop, tumour inside the liver, restore, loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_unet_variables

from livseg_jax.config import base_config
from livseg_jax.data.preprocess import PreprocessSettings, preprocess
from livseg_jax.data.stages import liver_crop_margin
from livseg_jax.inference.two_stage import (
    StageModel,
    load_stage_model,
    predict_case,
)
from livseg_jax.models import build_model
from livseg_jax.run_dir import RunCheckpoints, save_config, write_variables

SHAPE = (24, 40, 48)
SPACING = (2.5, 1.0, 1.0)
LIVER = (slice(6, 16), slice(10, 26), slice(10, 30))
SMALL_BLOB = (slice(18, 20), slice(30, 33), slice(38, 41))  # bright, separate: not the liver
TUMOUR = (slice(9, 12), slice(14, 18), slice(14, 18))
BONE = (slice(6, 10), slice(10, 14), slice(33, 36))  # brighter than tumour, 3 mm from the liver
EXACT = dict(body_threshold_hu=-500.0, inplane_factor=1, target_slice_spacing=0.0,
             hu_min=-200.0, hu_max=200.0, hu_scale=200.0)


def phantom() -> np.ndarray:
    """Returns a (D, H, W) HU volume: air, a body box, liver, a separate blob, tumour, bone."""
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[2:22, 4:36, 4:44] = 0.0
    ct[LIVER] = 150.0
    ct[SMALL_BLOB] = 150.0
    ct[TUMOUR] = 250.0
    ct[BONE] = 400.0
    return ct


def threshold_model(threshold, calls=None):
    """Returns a window function: foreground probability 1 where the scaled intensity > threshold.

    The sliding window calls it once per batch of windows (it is not jitted), so `calls` records
    every batch's shape."""

    def window_fn(variables, x):
        del variables
        if calls is not None:
            calls.append(x.shape)
        p = (x > threshold).astype(jnp.float32)
        return jnp.concatenate([1 - p, p], axis=-1)

    return window_fn


def window_probs(model, x):
    """Returns a StageModel's probabilities for a batch of windows, as numpy."""
    return np.asarray(model.window_fn(model.variables, jnp.asarray(x)))


def stage(name, window_fn, preprocess_config=EXACT, margin_mm=5.0, window=(8, 16, 16)):
    return StageModel(stage=name, window_fn=window_fn, variables=None, num_classes=2, window=window,
                      preprocessing=PreprocessSettings.from_config(preprocess_config), overlap=0.5,
                      batch_size=2, liver_margin_mm=margin_mm)


def expected_labels() -> np.ndarray:
    out = np.zeros(SHAPE, np.uint8)
    out[LIVER] = 1
    out[TUMOUR] = 2
    return out


def test_two_stages_give_largest_liver_with_tumour_inside_on_the_original_grid():
    calls = []
    result = predict_case(phantom(), SPACING, stage("liver", threshold_model(0.5)),
                          stage("tumor", threshold_model(0.9, calls)))
    assert result.liver_found and result.labels.dtype == np.uint8
    assert result.info["tumor_crop"][2][1] + 4 > BONE[2].start  # the bone lies in the stage-2 crop
    # The bright blob and the bone are not liver (largest component), the bone is not tumour
    # (outside the liver), and the map is back on the input grid voxel for voxel.
    np.testing.assert_array_equal(result.labels, expected_labels())
    assert calls and {c[0] for c in calls} == {2}
    for phase in ("preprocess", "liver_inference", "liver_postprocess", "tumor_inference", "restore"):
        assert result.timings[phase] >= 0
    assert result.info["tumor_voxels"] == 3 * 4 * 4


def test_stage_two_crop_is_the_liver_box_plus_the_margin_in_preprocessed_voxels():
    margin_mm = 5.0
    calls = []
    result = predict_case(phantom(), SPACING, stage("liver", threshold_model(0.5)),
                          stage("tumor", threshold_model(0.9, calls), margin_mm=margin_mm))
    _, _, record = preprocess(phantom(), SPACING, EXACT)
    margin = liver_crop_margin(record.spacing, margin_mm)
    assert margin == (2, 5, 5)
    expected = []
    for box, start, size, m in zip(LIVER, record.crop_start, record.shape, margin, strict=True):
        expected.append([max(0, box.start - start - m), min(size, box.stop - start + m)])
    assert result.info["tumor_crop"] == expected
    crop_shape = tuple(b - a for a, b in expected)
    from livseg_jax.inference.sliding_window import num_windows

    assert result.info["tumor_windows"] == num_windows(crop_shape, (8, 16, 16), 0.5)
    assert len(calls) == -(-result.info["tumor_windows"] // 2)


def test_resampling_preprocessing_restores_the_shape_and_close_labels():
    pre = dict(EXACT, inplane_factor=2, target_slice_spacing=5.0)
    result = predict_case(phantom(), SPACING, stage("liver", threshold_model(0.5), pre),
                          stage("tumor", threshold_model(0.9), pre))
    labels, truth = result.labels, expected_labels()
    assert labels.shape == SHAPE
    assert result.info["preprocessed_shape"] == [10, 16, 20]
    for cls in (1, 2):
        a, b = labels >= cls, truth >= cls
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8


def test_tumour_model_with_other_preprocessing_uses_its_own_grid():
    calls = []
    coarse = dict(EXACT, inplane_factor=2)
    result = predict_case(phantom(), SPACING, stage("liver", threshold_model(0.5)),
                          stage("tumor", threshold_model(0.9, calls), coarse))
    assert "tumor_preprocess" in result.timings
    assert {c[1:4] for c in calls} == {(8, 16, 16)}
    truth = expected_labels()
    np.testing.assert_array_equal(result.labels >= 1, truth >= 1)  # the liver comes from stage 1
    tumour = result.labels == 2
    assert tumour[TUMOUR].all() and not np.any(tumour & (truth == 0))


def test_no_liver_gives_an_all_background_map_a_warning_and_no_stage_two():
    calls = []
    result = predict_case(phantom(), SPACING, stage("liver", threshold_model(10.0)),
                          stage("tumor", threshold_model(0.9, calls)))
    assert not result.liver_found
    assert result.labels.shape == SHAPE and not result.labels.any()
    assert any("no liver" in w for w in result.warnings)
    assert calls == []


def test_liver_only_prediction_without_a_tumour_model():
    result = predict_case(phantom(), SPACING, stage("liver", threshold_model(0.5)), None)
    np.testing.assert_array_equal(result.labels, (expected_labels() >= 1).astype(np.uint8))


def test_progress_reports_every_window_of_both_stages():
    seen = {}

    def progress(phase, total):
        seen[phase] = [total, 0]

        def advance(n):
            seen[phase][1] += n

        return advance

    result = predict_case(phantom(), SPACING, stage("liver", threshold_model(0.5)),
                          stage("tumor", threshold_model(0.9)), progress)
    assert seen["liver"] == [result.info["liver_windows"]] * 2
    assert seen["tumor"] == [result.info["tumor_windows"]] * 2


# ------------------------------------------------------------------------------- checkpoints

WINDOW = (16, 16, 16)


def tiny_config(stage_name):
    c = base_config()
    c.stage = stage_name
    c.model.name = "unet"
    c.model.features = (2, 4, 4, 4, 4)
    c.data.patch_size = WINDOW
    c.inference.overlap = 0.25
    c.inference.batch_size = 3
    return c


def random_variables(config, seed):
    return random_unet_variables(build_model(config.model, deploy=False), WINDOW, seed)


def write_run(workdir, config, variables, best_variables=None):
    save_config(workdir, config)
    ckpt = RunCheckpoints(workdir, keep=1)
    ckpt.save(1, {"step": np.int32(1), **variables})
    if best_variables is not None:
        ckpt.save_best(1, {"step": np.int32(1), **best_variables}, dice=0.5)
    ckpt.close()
    return workdir


def reference_probs(config, variables, x):
    model = build_model(config.model, deploy=False)
    return np.asarray(jax.nn.softmax(model.apply(variables, jnp.asarray(x), train=False), axis=-1))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = tiny_config("liver")
    variables = random_variables(config, 0)
    best = random_variables(config, 1)
    workdir = write_run(tmp_path_factory.mktemp("run"), config, variables, best)
    x = np.random.default_rng(5).normal(size=(3, *WINDOW, 1)).astype(np.float32)
    return workdir, config, variables, best, x


def test_loaded_deploy_model_matches_the_training_form_of_the_best_checkpoint(run):
    workdir, config, _, best, x = run
    deploy = load_stage_model(workdir, "liver", which="best")
    assert deploy.description["deploy"] is True
    np.testing.assert_allclose(window_probs(deploy, x), reference_probs(config, best, x), atol=2e-5)
    plain = load_stage_model(workdir, "liver", which="best", deploy=False)
    np.testing.assert_allclose(window_probs(plain, x), reference_probs(config, best, x), atol=2e-5)


def test_latest_loads_the_periodic_checkpoint_not_the_best(run):
    workdir, config, variables, best, x = run
    latest = load_stage_model(workdir, "liver", which="latest")
    probs = window_probs(latest, x)
    np.testing.assert_allclose(probs, reference_probs(config, variables, x), atol=2e-5)
    assert np.abs(probs - reference_probs(config, best, x)).max() > 1e-3


def test_converted_weights_directory_loads_like_a_run(run, tmp_path):
    _, config, variables, _, x = run
    directory = write_variables(tmp_path / "converted", variables, config)
    loaded = load_stage_model(directory, "liver")
    np.testing.assert_allclose(window_probs(loaded, x), reference_probs(config, variables, x), atol=2e-5)


def test_settings_come_from_the_config_unless_overridden(run):
    workdir, config, *_ = run
    m = load_stage_model(workdir, "liver")
    assert (m.window, m.overlap, m.batch_size) == (WINDOW, 0.25, 3)
    assert m.preprocessing.air_value == pytest.approx(-1.0)
    assert m.preprocessing.inplane_factor == config.preprocess.inplane_factor
    m = load_stage_model(workdir, "liver", overlap=0.5, batch_size=1, window=(16, 32, 32), mirror=True)
    assert (m.window, m.overlap, m.batch_size, m.description["mirror_tta"]) == ((16, 32, 32), 0.5, 1, True)


def test_wrong_stage_and_bad_window_are_refused_naming_the_checkpoint(run):
    workdir = run[0]
    with pytest.raises(ValueError, match=r"'liver' model.*given as the 'tumor'"):
        load_stage_model(workdir, "tumor")
    with pytest.raises(ValueError, match=r"window \(16, 24, 16\).*divisible by 16"):
        load_stage_model(workdir, "liver", window=(16, 24, 16))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_stage_model(workdir / "nope", "liver")
