"""Spacing-aware preprocessing: resampling to a target spacing, the median rule, the run's record."""

import dataclasses
import json
from fractions import Fraction

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from livseg_jax.config import base_config
from livseg_jax.data import cache, nifti
from livseg_jax.data import preprocess as pp
from livseg_jax.data import resample as rs
from livseg_jax.data import spacing as sp
from livseg_jax.data.layouts import CaseFiles
from livseg_jax.data.synthetic import make_phantom


def _cfg(**kw):
    c = base_config().preprocess
    c.update(kw)
    return c


def _phantom(shape_xyz=(61, 67, 19), spacing_xyz=(1.5, 1.5, 3.0), seed=3):
    """Returns (HU float32 (D, H, W), labels (D, H, W), spacing (sz, sy, sx)): odd sizes on purpose."""
    hu, lab = make_phantom(shape_xyz, spacing_xyz, seed)
    return hu.transpose(2, 1, 0).astype(np.float32), lab.transpose(2, 1, 0).copy(), tuple(spacing_xyz[::-1])


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _blobs(shape, rng):
    """Returns a (D, H, W) uint8 map: a random ball of liver (1) with a tumour (2) core."""
    centre = [rng.integers(0, s) for s in shape]
    radius = rng.integers(1, 6)
    d2 = sum((np.arange(s).reshape([-1 if i == a else 1 for i in range(3)]) - c) ** 2
             for a, (s, c) in enumerate(zip(shape, centre, strict=True)))
    lab = np.zeros(shape, np.uint8)
    lab[d2 <= radius**2] = 1
    lab[d2 <= (radius / 2) ** 2] = 2
    return lab


# ------------------------------------------------------------------------------- resampling


def test_target_shape_rounds_the_field_of_view_and_zero_keeps_the_axis():
    assert rs.target_shape((119, 416, 450), (1.6, 0.743, 0.743), (2.5, 0.8, 0)) == (
        round(119 * 1.6 / 2.5), round(416 * 0.743 / 0.8), 450)
    assert rs.target_shape((3, 4, 5), (1.0, 1.0, 1.0), (100.0, 1.0, 1.0)) == (1, 4, 5)


def test_linear_image_resampling_reproduces_a_linear_ramp_at_the_voxel_centres():
    n, m = 13, 29
    image = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None] * 3.0 - 7.0, (n, 4, 5))
    out = rs.resample_image(image, (m, 4, 5), "linear")
    x = np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)  # edges repeat the border voxel
    np.testing.assert_allclose(out[:, 2, 3], x * 3.0 - 7.0, atol=1e-5)
    assert out.dtype == np.float32


@pytest.mark.parametrize("interpolation", sorted(rs.IMAGE_ORDERS))
def test_image_resampling_equals_scipy_zoom_in_grid_mode(interpolation):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(9, 14, 11)).astype(np.float32)
    shape = (17, 6, 11)
    expected = ndimage.zoom(image, [m / n for n, m in zip(image.shape, shape, strict=True)],
                            order=rs.IMAGE_ORDERS[interpolation], mode="nearest", grid_mode=True, output=np.float32)
    np.testing.assert_allclose(rs.resample_image(image, shape, interpolation), expected, atol=1e-5)


def _nearest_reference(lab, shape):
    """Each output voxel takes the input voxel holding its centre, (o + 1/2) n / m, exactly."""
    idx = [[int(Fraction(2 * o + 1, 2) * n / m) for o in range(m)] for n, m in zip(lab.shape, shape, strict=True)]
    return lab[np.ix_(*idx)]


def _onehot_reference(lab, shape):
    """Every label's indicator zoomed linearly over the whole volume; near-ties to the higher label."""
    zoom = [m / n for n, m in zip(lab.shape, shape, strict=True)]
    scores = np.stack([ndimage.zoom((lab == c).astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True)
                       for c in range(int(lab.max()) + 1)])
    scores += rs.TIE_MARGIN * np.arange(len(scores), dtype=np.float32).reshape(-1, 1, 1, 1)
    return np.argmax(scores, axis=0).astype(np.uint8)


def test_label_resampling_equals_the_whole_volume_references():
    rng = np.random.default_rng(0)
    for _ in range(40):
        shape = tuple(int(s) for s in rng.integers(5, 30, 3))
        lab = _blobs(shape, rng)
        out_shape = tuple(max(1, int(s * f)) for s, f in zip(shape, rng.uniform(0.3, 2.5, 3), strict=True))
        np.testing.assert_array_equal(rs.resample_labels(lab, out_shape, "nearest"), _nearest_reference(lab, out_shape))
        # The one-hot path interpolates only the foreground's box: same result as the whole volume.
        np.testing.assert_array_equal(rs.resample_labels(lab, out_shape, "linear_onehot"),
                                      _onehot_reference(lab, out_shape))


def test_onehot_ties_go_to_the_higher_label_and_empty_maps_stay_empty():
    lab = np.array([[[0, 1, 1, 2]]], np.uint8)  # (1, 1, 4) -> (1, 1, 2): each pair ties half and half
    np.testing.assert_array_equal(rs.resample_labels(lab, (1, 1, 2), "linear_onehot"), [[[1, 2]]])
    assert not rs.resample_labels(np.zeros((4, 5, 6), np.uint8), (7, 3, 2), "linear_onehot").any()
    with pytest.raises(ValueError, match="label interpolation"):
        rs.resample_labels(lab, (1, 1, 2), "cubic")


# ------------------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("labels", sorted(rs.LABEL_METHODS))
def test_target_mode_reaches_the_spacing_and_restores_the_original_grid(labels):
    image, label, spacing = _phantom()
    target = (2.0, 0.75, 0)  # slices 3 -> 2 mm, rows 1.5 -> 0.75 mm, columns kept
    out, out_lab, rec = pp.preprocess(image, spacing, _cfg(spacing_mode="target", target_spacing=target,
                                                            label_interpolation=labels), label)
    assert out.shape == out_lab.shape == tuple(rec.shape) and out.dtype == np.float32
    assert rec.spacing == pytest.approx((2.0, 0.75, spacing[2]), rel=0.03)
    assert rec.shape == rs.target_shape(rec.crop_shape, spacing, target)
    assert out.min() >= -1.0 and out.max() <= 1.0
    back = pp.restore(out_lab, json.loads(json.dumps(rec.to_dict())))
    assert back.shape == image.shape and back.dtype == np.uint8
    assert _dice(back >= 1, label >= 1) > 0.97 and _dice(back == 2, label == 2) > 0.9


def test_target_equal_to_the_spacing_changes_only_the_window():
    image, label, spacing = _phantom()
    out, lab, rec = pp.preprocess(image, spacing, _cfg(spacing_mode="target", target_spacing=spacing), label)
    np.testing.assert_array_equal(lab, label[rec.crop_bbox])
    np.testing.assert_allclose(out, np.clip(image[rec.crop_bbox], -200, 200) / 200, atol=1e-6)
    np.testing.assert_array_equal(pp.restore(lab, rec)[rec.crop_bbox], label[rec.crop_bbox])


def test_cubic_images_follow_the_setting():
    image, _, spacing = _phantom()
    settings = _cfg(spacing_mode="target", target_spacing=(1.7, 1.1, 1.3))
    linear, _, rec = pp.preprocess(image, spacing, settings)
    cubic, _, _ = pp.preprocess(image, spacing, {**settings.to_dict(), "image_interpolation": "cubic"})
    crop = image[rec.crop_bbox]
    for out, name in ((linear, "linear"), (cubic, "cubic")):
        expected = np.clip(rs.resample_image(crop, rec.shape, name), -200, 200) / 200
        np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.abs(linear - cubic).max() > 1e-3


def test_records_of_the_fixed_factor_era_still_read():
    image, label, spacing = _phantom()
    _, lab, rec = pp.preprocess(image, spacing, _cfg(), label)
    old = {k: v for k, v in rec.to_dict().items() if k not in ("spacing_mode", "label_interpolation")}
    assert pp.PreprocessRecord.from_dict(old) == rec
    np.testing.assert_array_equal(pp.restore(lab, old), pp.restore(lab, rec))


# ------------------------------------------------------------------------------- settings


def test_settings_refuse_contradictions_naming_the_key():
    with pytest.raises(ValueError, match="spacing_mode must be one of"):
        pp.PreprocessSettings.from_config(_cfg(spacing_mode="nnunet"))
    with pytest.raises(ValueError, match="target_spacing is used by spacing_mode 'target'"):
        pp.PreprocessSettings.from_config(_cfg(target_spacing=(3.0, 0.8, 0.8)))
    with pytest.raises(ValueError, match="need spacing_mode 'target' or 'median'"):
        pp.PreprocessSettings.from_config(_cfg(label_interpolation="linear_onehot"))
    with pytest.raises(ValueError, match="target_slice_spacing belongs to spacing_mode 'fixed_factor'"):
        pp.PreprocessSettings.from_config(_cfg(spacing_mode="target", target_slice_spacing=2.0))
    with pytest.raises(ValueError, match="target_spacing must be 3 numbers"):
        pp.PreprocessSettings.from_config(_cfg(spacing_mode="target", target_spacing=(1.0, -1.0, 1.0)))
    with pytest.raises(ValueError, match="image_interpolation must be one of"):
        pp.PreprocessSettings.from_config(_cfg(spacing_mode="target", image_interpolation="quintic"))
    with pytest.raises(ValueError, match="all three spacings"):
        pp.PreprocessSettings.from_config(_cfg(spacing_mode="median", target_spacing=(2.0, 0.0, 0.8)))


def test_target_mode_ignores_the_fixed_factor_settings_for_equality():
    a = pp.PreprocessSettings.from_config(_cfg(spacing_mode="target", target_spacing=(2, 1, 1), inplane_factor=2))
    b = pp.PreprocessSettings.from_config(_cfg(spacing_mode="target", target_spacing=(2, 1, 1), inplane_factor=1))
    assert a == b and a.cache_key(1) == b.cache_key(1) and a.inplane_factor == 1


def test_a_config_section_saved_before_the_spacing_keys_reads_as_the_paper_preset():
    six = {k: v for k, v in _cfg().to_dict().items() if k not in pp.SPACING_KEYS}
    assert pp.PreprocessSettings.from_config(six) == pp.PreprocessSettings.from_config(_cfg())


SPACING_CHANGES = [
    dict(spacing_mode="target", target_spacing=(2.0, 0.8, 0.8)),
    dict(spacing_mode="target", target_spacing=(2.0, 0.8, 0.9)),
    dict(spacing_mode="target", target_spacing=(2.0, 0.8, 0.8), image_interpolation="cubic"),
    dict(spacing_mode="target", target_spacing=(2.0, 0.8, 0.8), label_interpolation="linear_onehot"),
    dict(spacing_mode="median", target_spacing=(2.0, 0.8, 0.8)),
    dict(spacing_mode="target", target_spacing=(0.0, 0.0, 0.0)),
    dict(),  # the paper preset
]


def test_cache_keys_differ_whenever_the_spacing_settings_differ(tmp_path):
    settings = [pp.PreprocessSettings.from_config(_cfg(**c)) for c in SPACING_CHANGES]
    keys = [s.cache_key(cache.CACHE_VERSION) for s in settings]
    assert len(set(keys)) == len(keys)
    folders = {cache.entry_folder(tmp_path, s) for s in settings}
    assert len(folders) == len(settings)


def test_an_unresolved_median_is_refused_by_preprocess_and_the_cache(tmp_path):
    image, _, spacing = _phantom()
    with pytest.raises(ValueError, match="'median' has no target_spacing yet"):
        pp.preprocess(image, spacing, _cfg(spacing_mode="median"))
    case = CaseFiles("volume-0", tmp_path / "volume-0.nii.gz", None)
    with pytest.raises(ValueError, match="'median' has no target_spacing yet"):
        cache.build_cache([case], _cfg(spacing_mode="median"), tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------- median rule


def test_median_rule_takes_the_per_axis_median_of_ordinary_ct():
    spacings = [(1.0, 0.8, 0.8), (2.0, 0.7, 0.7), (3.0, 0.9, 0.6)]
    shapes = [(300, 512, 512), (150, 512, 512), (100, 512, 512)]
    # 2.0 is not above 3 x 0.8: no anisotropy, the median per axis.
    assert sp.median_target_spacing(spacings, shapes) == pytest.approx((2.0, 0.8, 0.7))


def test_median_rule_takes_the_10th_percentile_on_an_anisotropic_axis():
    z = [1.0, 4.0, 5.0, 5.0, 6.0]
    spacings = [(s, 0.8, 0.8) for s in z]
    few_slices = [(n, 512, 512) for n in (300, 60, 50, 50, 40)]  # median 50 slices, 3 x 50 < 512
    # median z 5.0 > 3 x 0.8 and the median case is thin in z: the 10th percentile of z, linear
    # between the sorted values 1.0 and 4.0 at 0.4 of the way: 2.2.
    assert sp.median_target_spacing(spacings, few_slices) == pytest.approx((2.2, 0.8, 0.8))
    many_slices = [(n, 512, 512) for n in (900, 400, 400, 300, 300)]  # not thin in voxels: the median
    assert sp.median_target_spacing(spacings, many_slices) == pytest.approx((5.0, 0.8, 0.8))


def test_median_rule_never_makes_the_coarse_axis_finer_than_the_others():
    spacings = [(z, 2.0, 2.0) for z in (0.5, 0.6, 7.0, 7.0, 7.0)]
    shapes = [(30, 256, 256)] * 5
    target = sp.median_target_spacing(spacings, shapes)  # 10th percentile 0.54 < 2.0
    assert target[0] == pytest.approx(2.0 + 1e-5, abs=1e-9) and target[1:] == (2.0, 2.0)


def test_median_rule_works_on_any_axis_and_refuses_bad_input():
    spacings = [(0.8, 5.0, 0.8)] * 3
    assert sp.median_target_spacing(spacings, [(512, 40, 512)] * 3) == pytest.approx((0.8, 5.0, 0.8))
    with pytest.raises(ValueError, match="one .* spacing and one .* shape per case"):
        sp.median_target_spacing([], [])
    with pytest.raises(ValueError, match="positive and finite"):
        sp.median_target_spacing([(0.0, 1.0, 1.0)], [(1, 1, 1)])


def _write_case(path, spacing_xyz, shape_xyz, slices_first=False):
    """Writes a NIfTI CT; `slices_first` stores the slice axis first on disk (a permuted affine)."""
    affine = np.diag([*spacing_xyz, 1.0])
    shape = shape_xyz
    if slices_first:
        affine, shape = affine[:, [2, 1, 0, 3]], shape_xyz[::-1]
    hu = np.linspace(-1000, 200, int(np.prod(shape))).reshape(shape).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, affine), path)
    return path


def test_resolve_reads_headers_in_internal_order_and_refuses_another_given_spacing(tmp_path):
    paths = [_write_case(tmp_path / f"volume-{i}.nii.gz", (0.7 + 0.1 * i, 0.7 + 0.1 * i, 2.0 * (i + 1)),
                         (20, 22, 8), slices_first=i == 1) for i in range(3)]
    for i, path in enumerate(paths):
        grid_spacing, grid_shape = sp.header_grid(path)
        assert grid_spacing == pytest.approx((2.0 * (i + 1), 0.7 + 0.1 * i, 0.7 + 0.1 * i))
        assert grid_shape == (8, 22, 20) == nifti.read_case(path).image.shape
    computed = sp.resolve_median_spacing(_cfg(spacing_mode="median"), paths)
    assert computed == pytest.approx((4.0, 0.8, 0.8))
    assert sp.resolve_median_spacing(_cfg(spacing_mode="median", target_spacing=computed), paths) == computed
    with pytest.raises(ValueError, match="differs from .* the median rule over the 3 training cases"):
        sp.resolve_median_spacing(_cfg(spacing_mode="median", target_spacing=(3.0, 0.8, 0.8)), paths)
    with pytest.raises(nifti.DataError, match="cannot read as NIfTI"):
        sp.header_grid(tmp_path)


# ---------------------------------------------------------------------- training and prediction


def test_training_records_the_median_spacing_and_prediction_uses_the_runs_grid(tmp_path):
    from helpers import random_unet_variables

    from livseg_jax.inference.two_stage import load_stage_model, predict_case
    from livseg_jax.models import build_model
    from livseg_jax.run_dir import load_config, write_variables
    from livseg_jax.training.loop import dataset_cases, prepare_stage_cases

    config = base_config()
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.synthetic.update(num_cases=3, shape=(40, 40, 10), spacing=(1.2, 1.2, 4.0))
    config.data.num_val_cases = 1
    config.preprocess.spacing_mode = "median"
    config.model.update(name="unet", features=(2, 4, 4, 4, 4))
    train, val = prepare_stage_cases(config)  # sets the run's preprocess.target_spacing
    assert len(train) == 2 and len(val) == 1
    assert tuple(config.preprocess.target_spacing) == pytest.approx((4.0, 1.2, 1.2))
    cached = cache.build_cache(dataset_cases(config), config.preprocess, tmp_path / "cache" / "preprocessed",
                               progress=False)  # the entries training made, reused
    assert all(c.record.spacing == pytest.approx((4.0, 1.2, 1.2)) for c in cached)

    window = (16, 16, 16)
    variables = random_unet_variables(build_model(config.model, deploy=False), window)
    run = write_variables(tmp_path / "run", variables, config)
    assert tuple(load_config(run).preprocess.target_spacing) == tuple(config.preprocess.target_spacing)
    liver = load_stage_model(run, "liver", window=window)
    assert liver.preprocessing == pp.PreprocessSettings.from_config(config.preprocess)

    def everything_is_liver(variables, x):
        del variables
        return jnp.concatenate([jnp.zeros_like(x), jnp.ones_like(x)], axis=-1)

    image, _, spacing = _phantom(shape_xyz=(50, 46, 13), spacing_xyz=(0.8, 0.8, 2.5))
    result = predict_case(image, spacing, dataclasses.replace(liver, window_fn=everything_is_liver))
    # The case's own 2.5 x 0.8 x 0.8 mm went onto the run's 4 x 1.2 x 1.2 mm grid, and back.
    assert result.info["preprocessed_spacing"] == pytest.approx([4.0, 1.2, 1.2], rel=0.1)
    assert result.labels.shape == image.shape and result.labels.any()


# ------------------------------------------------------------------------------- real CT


@pytest.fixture(scope="module")
def ircad17_case(shared_data, tmp_path_factory):
    """3D-IRCADb-01 patient 1.17 (512 x 512 x 119, 0.743 x 0.743 x 1.6 mm) imported and read once."""
    from livseg_jax.data import ircadb

    src = shared_data / "3Dircadb1" / "3Dircadb1.17"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    (report,) = ircadb.import_ircadb(src, tmp_path_factory.mktemp("ircad"), log=None)
    return report, nifti.read_case(report.image_path, report.label_path)


@pytest.mark.real_data
@pytest.mark.parametrize("labels,target", [("linear_onehot", (2.0, 1.0, 1.0)), ("nearest", (1.0, 0.8, 0.8))])
def test_real_ircad_case_resampled_to_a_target_spacing_restores_onto_its_grid(ircad17_case, labels, target,
                                                                              tmp_path):
    report, case = ircad17_case
    assert sp.header_grid(report.image_path) == (tuple(case.spacing), case.image.shape)
    settings = _cfg(spacing_mode="target", target_spacing=target, label_interpolation=labels)
    _, label, record = pp.preprocess(case.image, case.spacing, settings, case.label)
    assert record.spacing == pytest.approx(target, rel=0.01)
    back = pp.restore(label, record.to_dict())
    out = nifti.write_label_map(back, case.geometry, tmp_path / "restored.nii.gz")
    restored, truth = nib.load(out), nib.load(report.label_path)
    assert restored.shape == truth.shape
    np.testing.assert_array_equal(restored.affine, truth.affine)
    r, t = np.asarray(restored.dataobj), np.asarray(truth.dataobj)
    assert _dice(r >= 1, t >= 1) >= 0.99
    assert _dice(r == 2, t == 2) >= 0.97
