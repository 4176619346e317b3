"""Synthetic CT phantoms: deterministic, realistic HU, tumours inside the liver, LiTS files on disk."""

import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from livseg_jax.data import nifti
from livseg_jax.data.layouts import discover
from livseg_jax.data.synthetic import make_phantom, write_synthetic_dataset

SMALL, SMALL_SPACING = (80, 80, 32), (3.0, 3.0, 6.0)


def test_same_seed_same_phantom_other_seed_other_phantom():
    a = make_phantom(SMALL, SMALL_SPACING, seed=7)
    b = make_phantom(SMALL, SMALL_SPACING, seed=7)
    c = make_phantom(SMALL, SMALL_SPACING, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert a[0].dtype == np.int16 and a[1].dtype == np.uint8 and a[0].shape == SMALL


def test_tissue_intensities_look_like_ct():
    hu, lab = make_phantom((128, 128, 48), (1.5, 1.5, 3.0), seed=2)
    liver = hu[lab == 1].astype(float)
    assert 50 < np.median(liver) < 75
    assert np.median(hu[:4, :4, :]) < -950  # air in the corner
    hist, edges = np.histogram(hu, bins=np.arange(-1025, 1000, 25))
    soft = hist[(edges[:-1] > -300) & (edges[:-1] < 300)]
    fat_peak = edges[:-1][(edges[:-1] > -300) & (edges[:-1] < 300)][np.argmax(soft)]
    assert -150 <= fat_peak <= 75  # fat or soft tissue dominate the body, not air or bone
    assert (hu > 300).sum() > 0  # bone
    assert (hu < -110).sum() > (lab == 1).sum()  # more air than liver


def test_tumours_are_hypodense_inside_the_liver_and_vary_in_size():
    counts, diameters = [], []
    for seed in range(24):
        hu, lab = make_phantom(SMALL, SMALL_SPACING, seed=seed)
        comps, n = ndimage.label(lab == 2)
        counts.append(n)
        ring = ndimage.binary_dilation(lab == 2) & (lab != 2)
        if n:
            assert (lab[ring] == 1).mean() > 0.5  # tumour borders are mostly liver
            delta = np.median(hu[lab == 1]) - np.median(hu[lab == 2])
            assert 12 < delta < 50
        for k in range(1, n + 1):
            volume = (comps == k).sum() * np.prod(SMALL_SPACING)
            diameters.append((6 * volume / np.pi) ** (1 / 3))
    assert min(counts) == 0 and max(counts) >= 3
    assert min(diameters) < 10 and max(diameters) > 20


def test_liver_is_one_piece_on_the_patients_right_and_spacing_is_physical():
    fine = make_phantom((96, 96, 40), (2.0, 2.0, 4.0), seed=4)[1]
    coarse = make_phantom((48, 48, 20), (4.0, 4.0, 8.0), seed=4)[1]
    assert ndimage.label(fine >= 1)[1] == 1
    xs = np.nonzero(fine >= 1)[0]
    assert xs.mean() < fine.shape[0] / 2  # RAS x: lower x = patient's right
    vol_fine = (fine >= 1).sum() * 2 * 2 * 4
    vol_coarse = (coarse >= 1).sum() * 4 * 4 * 8
    assert vol_coarse == pytest.approx(vol_fine, rel=0.1)


def test_default_size_is_fast():
    start = time.perf_counter()
    make_phantom((160, 160, 64), (1.5, 1.5, 3.0), seed=0)
    assert time.perf_counter() - start < 2.5


def test_dataset_is_lits_layout_and_reads_back_in_internal_orientation(tmp_path, recwarn):
    cases = write_synthetic_dataset(
        tmp_path, num_cases=2, shape=(40, 36, 10), spacing=(2.0, 2.5, 5.0), seed=9
    )
    assert discover(tmp_path) == cases
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "segmentation-0.nii.gz",
        "segmentation-1.nii.gz",
        "synthetic.json",
        "volume-0.nii.gz",
        "volume-1.nii.gz",
    ]
    img = nib.load(cases[1].image)
    assert img.get_data_dtype() == np.int16 and img.shape == (40, 36, 10)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 2.5, 5.0))
    case = nifti.read_case(cases[1].image, cases[1].label)
    assert not [w for w in recwarn if issubclass(w.category, nifti.HUWarning)]
    hu, lab = make_phantom((40, 36, 10), (2.0, 2.5, 5.0), seed=[9, 1])
    np.testing.assert_array_equal(case.image, hu.transpose(2, 1, 0))
    np.testing.assert_array_equal(case.label, lab.transpose(2, 1, 0))
    np.testing.assert_allclose(case.spacing, (5.0, 2.5, 2.0))


def test_dataset_is_reused_when_settings_match_and_rewritten_otherwise(tmp_path):
    args = dict(num_cases=1, shape=(32, 32, 8), spacing=(2.0, 2.0, 4.0))
    (case,) = write_synthetic_dataset(tmp_path, seed=1, **args)
    stamp = case.image.stat().st_mtime_ns
    write_synthetic_dataset(tmp_path, seed=1, **args)
    assert case.image.stat().st_mtime_ns == stamp
    before = nib.load(case.label).get_fdata()
    write_synthetic_dataset(tmp_path, seed=2, **args)
    assert not np.array_equal(nib.load(case.label).get_fdata(), before)


def test_generation_announces_itself_once(tmp_path, capsys):
    args = dict(num_cases=1, shape=(32, 32, 8), spacing=(2.0, 2.0, 4.0), seed=1)
    write_synthetic_dataset(tmp_path, **args)
    assert f"generating 1 synthetic CT phantoms into {tmp_path} (first run only)" in capsys.readouterr().out
    write_synthetic_dataset(tmp_path, **args)  # reused: nothing to wait for, nothing printed
    assert capsys.readouterr().out == ""
