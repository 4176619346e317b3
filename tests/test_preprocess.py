"""Preprocessing: body crop, slice resampling, in-plane down-sampling, window, and exact restore."""

import dataclasses
import json

import ml_collections
import numpy as np
import pytest

from livseg_jax.config import base_config
from livseg_jax.data import preprocess as pp
from livseg_jax.data import regions
from livseg_jax.data.synthetic import make_phantom


def _cfg(**kw) -> ml_collections.ConfigDict:
    c = base_config().preprocess
    c.update(kw)
    return c


def _phantom(shape_xyz=(61, 67, 19), spacing_xyz=(1.5, 1.5, 3.0), seed=3):
    """Returns (HU float32 (D, H, W), labels (D, H, W), spacing (sz, sy, sx)): odd sizes on purpose."""
    hu, lab = make_phantom(shape_xyz, spacing_xyz, seed)
    return (
        hu.transpose(2, 1, 0).astype(np.float32),
        lab.transpose(2, 1, 0).copy(),
        tuple(spacing_xyz[::-1]),
    )


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_restore_gives_original_shape_and_high_dice_for_odd_sizes():
    image, label, spacing = _phantom()
    out_img, out_lab, rec = pp.preprocess(image, spacing, _cfg(), label)
    assert out_img.shape == out_lab.shape == tuple(rec.shape)
    assert out_img.dtype == np.float32 and out_lab.dtype == np.uint8
    back = pp.restore(out_lab, rec)
    assert back.shape == image.shape and back.dtype == np.uint8
    assert _dice(back >= 1, label >= 1) > 0.95
    assert set(np.unique(back)) <= {0, 1, 2}


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_restore_is_an_exact_inverse_of_label_downsampling(factor):
    # Any label map on the preprocessed grid survives restore -> preprocess unchanged.
    image, _, spacing = _phantom()
    cfg = _cfg(inplane_factor=factor)
    _, _, rec = pp.preprocess(image, spacing, cfg)
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 3, size=rec.shape).astype(np.uint8)
    full = pp.restore(coarse, rec)
    outside = np.ones(image.shape, bool)
    outside[rec.crop_bbox] = False
    assert not full[outside].any()
    _, again, _ = pp.preprocess(image, spacing, cfg, full)
    np.testing.assert_array_equal(again, coarse)


def test_inplane_pooling_averages_blocks_and_pads_odd_edges():
    image = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    pooled, pad = pp.downsample_image_inplane(image, 2)
    assert pooled.shape == (2, 3, 2) and pad == (1, 1)
    assert pooled[0, 0, 0] == pytest.approx(image[0, :2, :2].mean())
    assert pooled[1, 2, 1] == pytest.approx(image[1, 4, 2])  # corner block: only edge copies
    assert pooled[0, 2, 0] == pytest.approx(image[0, 4, :2].mean())


def test_label_majority_breaks_ties_towards_foreground_and_tumour():
    lab = np.array([[[0, 1, 0, 0], [1, 0, 0, 2]], [[2, 2, 1, 1], [0, 0, 0, 0]]], np.uint8)  # (2, 2, 4)
    down = pp.downsample_labels_inplane(lab, 2)
    # slice 0: block 0 has two liver -> 1; block 1 has one tumour of four -> 0.
    # slice 1: block 0 has two tumours -> 2; block 1 has two liver -> 1.
    np.testing.assert_array_equal(down, [[[1, 0]], [[2, 1]]])


def test_spacing_record_and_window():
    image, _, spacing = _phantom()
    out, _, rec = pp.preprocess(image, spacing, _cfg())
    assert rec.spacing == pytest.approx((spacing[0], 2 * spacing[1], 2 * spacing[2]))
    assert out.min() >= -1.0 and out.max() <= 1.0
    # Window after pooling: a fully soft-tissue block keeps its mean HU / 200.
    d, h, w = (s // 2 for s in rec.shape)
    start = np.array(rec.crop_start)
    block = image[
        start[0] + d, start[1] + 2 * h : start[1] + 2 * h + 2, start[2] + 2 * w : start[2] + 2 * w + 2
    ]
    assert out[d, h, w] == pytest.approx(np.clip(block.mean(), -200, 200) / 200, abs=1e-5)


def test_slice_resampling_to_target_spacing_and_back():
    image, label, spacing = _phantom(shape_xyz=(64, 64, 30), spacing_xyz=(1.5, 1.5, 2.0))
    out, out_lab, rec = pp.preprocess(image, spacing, _cfg(target_slice_spacing=5.0), label)
    assert rec.spacing[0] == pytest.approx(5.0)
    assert out.shape[0] == int((rec.crop_shape[0] - 1) * 2.0 / 5.0) + 1
    back = pp.restore(out_lab, rec)
    assert back.shape == image.shape
    assert _dice(back >= 1, label >= 1) > 0.85
    # Upsampling the slice axis and restoring loses nothing along it.
    _, lab_up, rec_up = pp.preprocess(image, spacing, _cfg(target_slice_spacing=1.0, inplane_factor=1), label)
    assert lab_up.shape[0] == 2 * rec_up.crop_shape[0] - 1
    np.testing.assert_array_equal(pp.restore(lab_up, rec_up), label)


def test_body_crop_excludes_table_and_air():
    image = np.full((6, 80, 90), -1000.0, np.float32)
    image[:, 20:60, 10:70] = 40.0  # body
    image[:, 30:40, 30:40] = -800.0  # air inside the body (lung, gas): filled, does not matter
    image[:, 70:74, 5:85] = 200.0  # table, separated by an air gap
    _, _, rec = pp.preprocess(image, (3.0, 1.0, 1.0), _cfg())
    assert rec.body_found
    assert rec.crop_start[0] == 0 and rec.crop_stop[0] == 6
    assert 19 <= rec.crop_start[1] <= 20 and 60 <= rec.crop_stop[1] <= 61
    assert 9 <= rec.crop_start[2] <= 10 and 70 <= rec.crop_stop[2] <= 71
    mask = pp.body_mask(image, -500.0)
    assert mask[:, 35, 35].all() and not mask[:, 72, 40].any()
    assert regions.bbox_of(mask) == (slice(0, 6), slice(20, 60), slice(10, 70))


def test_all_air_volume_is_not_cropped_and_restores():
    image = np.full((4, 10, 12), -1000.0, np.float32)
    out, _, rec = pp.preprocess(image, (2.0, 1.0, 1.0), _cfg())
    assert not rec.body_found and rec.crop_shape == image.shape
    assert pp.restore(np.ones(out.shape, np.uint8), rec).all()


def test_record_survives_json_and_dict_restore():
    image, label, spacing = _phantom()
    _, lab, rec = pp.preprocess(image, spacing, _cfg(), label)
    d = json.loads(json.dumps(rec.to_dict()))
    assert pp.PreprocessRecord.from_dict(d) == rec
    np.testing.assert_array_equal(pp.restore(lab, d), pp.restore(lab, rec))
    with pytest.raises(ValueError, match="version"):
        pp.PreprocessRecord.from_dict({**d, "version": 99})


def test_restore_rejects_labels_of_the_wrong_shape():
    image, _, spacing = _phantom()
    _, _, rec = pp.preprocess(image, spacing, _cfg())
    with pytest.raises(ValueError, match="preprocessed shape"):
        pp.restore(np.zeros((1, 2, 3), np.uint8), rec)


@pytest.mark.parametrize("shape,density", [((3, 17, 23), 0.5), ((2, 40, 31), 0.8), ((4, 3, 9), 0.6), ((1, 2, 5), 0.9)])
def test_fast_inplane_opening_equals_scipy(shape, density):
    from scipy import ndimage

    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) < density
    mask[:, 0, :] = True  # components touching the border, where border handling matters
    expected = ndimage.binary_opening(mask, structure=np.ones((1, 3, 3), bool))
    np.testing.assert_array_equal(pp._open_inplane(mask), expected)
    if min(shape[1:]) >= 10:  # large enough for the opening to keep some voxels and drop others
        assert expected.any() and not expected.all()


@pytest.mark.parametrize("dtype", [np.int16, np.float64, np.float32])
def test_inplane_downsampling_equals_converting_to_float32_first(dtype):
    rng = np.random.default_rng(0)
    image = (rng.normal(size=(3, 33, 46)) * 500).astype(dtype)  # odd rows: edge padding
    padded = np.pad(image.astype(np.float32), ((0, 0), (0, 1), (0, 0)), mode="edge")
    expected = (padded[:, 0::2, 0::2] + padded[:, 0::2, 1::2] + padded[:, 1::2, 0::2]
                + padded[:, 1::2, 1::2]) * np.float32(0.25)
    out, pad = pp.downsample_image_inplane(image, 2)
    assert pad == (1, 0) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


SETTING_CHANGES = dict(body_threshold_hu=-400.0, inplane_factor=1, target_slice_spacing=2.5, hu_min=-100.0,
                       hu_max=300.0, hu_scale=100.0)


def test_settings_equal_when_the_six_settings_are_equal_whatever_their_number_type():
    section = _cfg()
    a = pp.PreprocessSettings.from_config(section)
    b = pp.PreprocessSettings.from_config({**section.to_dict(), "hu_min": int(section.hu_min), "extra": 1})
    assert a == b and hash(a) == hash(b) and a.cache_key(1) == b.cache_key(1)
    assert a.to_dict() == {k: section[k] for k in SETTING_CHANGES} | {
        k: tuple(section[k]) if k == "target_spacing" else section[k] for k in pp.SPACING_KEYS}
    assert pp.as_settings(section) == a and pp.as_settings(a) is a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.hu_min = 0.0


@pytest.mark.parametrize("key", sorted(SETTING_CHANGES))
def test_each_setting_changes_equality_and_the_cache_key(key):
    base = pp.PreprocessSettings.from_config(_cfg())
    other = dataclasses.replace(base, **{key: SETTING_CHANGES[key]})
    assert other != base
    assert other.cache_key(1) != base.cache_key(1)


def test_cache_key_is_stable_across_versions_of_the_code_and_names_the_format_versions():
    base = pp.PreprocessSettings.from_config(base_config().preprocess)
    # The default settings' cache folder, as named since the cache was introduced: a change here
    # makes every existing cache rebuild.
    assert base.cache_key(1) == "22472b6620ed9e8c"
    assert base.cache_key(2) != base.cache_key(1)
    # The spacing settings added later are not part of a fixed-factor key (they hold their defaults).
    six = {k: v for k, v in base.to_dict().items() if k not in pp.SPACING_KEYS}
    assert base.cache_fields(1) == {**six, "record_version": pp.RECORD_VERSION, "cache_version": 1}


def test_air_value_is_hu_min_over_hu_scale():
    assert pp.PreprocessSettings.from_config(_cfg()).air_value == pytest.approx(-1.0)
    assert pp.PreprocessSettings.from_config(_cfg(hu_min=-150.0, hu_scale=50.0)).air_value == pytest.approx(-3.0)


@pytest.mark.parametrize("factor", [0, -2, 1.5])
def test_settings_refuse_an_inplane_factor_that_is_not_a_count(factor):
    with pytest.raises(ValueError, match="inplane_factor must be >= 1"):
        pp.PreprocessSettings.from_config({**_cfg().to_dict(), "inplane_factor": factor})


def test_preprocess_takes_settings_or_a_config_section_alike():
    image, label, spacing = _phantom()
    by_section = pp.preprocess(image, spacing, _cfg(), label)
    by_settings = pp.preprocess(image, spacing, pp.PreprocessSettings.from_config(_cfg()), label)
    np.testing.assert_array_equal(by_section[0], by_settings[0])
    assert by_section[2] == by_settings[2]
