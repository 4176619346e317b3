"""A CT read in its on-disk integer type (`nifti.read_image_native`) predicts as the float32 read:
same voxels, same preprocessing, same restored and written label maps."""

import os
import pathlib

import nibabel as nib
import numpy as np
import pytest
from test_two_stage import EXACT, stage, threshold_model

from livseg_jax.data import nifti
from livseg_jax.data import preprocess as pre
from livseg_jax.data.synthetic import make_phantom, write_phantom
from livseg_jax.inference.two_stage import Predictor

REAL = pathlib.Path(os.environ.get("LIVSEG_REAL_DATA", pathlib.Path(__file__).parents[1] / ".." / "shared" / "data"))
SPACING = (1.5, 1.5, 3.0)


@pytest.fixture(autouse=True)
def three_threads(monkeypatch):
    """Splits slab work over 3 threads even on a 2-core runner, so the parallel paths run."""
    monkeypatch.setenv("LIVSEG_THREADS", "3")


@pytest.fixture(scope="module")
def synthetic_ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    hu, labels = make_phantom((41, 38, 22), SPACING, seed=3)  # odd sizes: in-plane padding
    write_phantom(hu, labels, SPACING, root / "volume-0.nii.gz", root / "segmentation-0.nii.gz")
    return root / "volume-0.nii.gz"


def settings_grid():
    """Returns preprocessing settings covering every grid: pooled, slices resampled, target spacing."""
    return [pre.PreprocessSettings(**{**EXACT, "inplane_factor": 2}),
            pre.PreprocessSettings(**{**EXACT, "inplane_factor": 3, "target_slice_spacing": 2.0}),
            # A threshold float32 rounds (to -500.0): int16 voxels must be compared with the rounded value.
            pre.PreprocessSettings(**{**EXACT, "body_threshold_hu": -500.00000001, "inplane_factor": 2}),
            pre.PreprocessSettings(**{**EXACT, "spacing_mode": "target", "target_spacing": (2.0, 2.2, 2.2),
                                      "target_slice_spacing": 0.0})]


def assert_preprocesses_alike(native, reference, spacing):
    for settings in settings_grid():
        got, _, record = pre.preprocess(native, spacing, settings)
        expected, _, expected_record = pre.preprocess(reference, spacing, settings)
        assert record == expected_record
        np.testing.assert_array_equal(got, expected)


def test_synthetic_int16_ct_reads_as_a_view_equal_to_the_float32_read(synthetic_ct):
    native, geometry = nifti.read_image_native(synthetic_ct)
    reference, reference_geometry = nifti.read_image(synthetic_ct)
    assert native.dtype == np.int16 and not native.flags.writeable  # a view of the inflated bytes
    assert geometry.to_dict() == reference_geometry.to_dict()
    np.testing.assert_array_equal(native, reference)
    assert_preprocesses_alike(native, reference, geometry.spacing)


def test_the_threshold_is_compared_in_float32_for_integer_voxels():
    image = np.full((3, 8, 8), -600, np.int16)
    image[:, 2:6, 2:6] = -500  # float32(-500.00000001) == -500: not above the threshold
    image[1, 3:5, 3:5] = 100
    for threshold in (-500.00000001, -499.99999999, -500.0):
        np.testing.assert_array_equal(pre._threshold_open(image, threshold),
                                      pre._threshold_open(image.astype(np.float32), threshold))


@pytest.mark.parametrize("dtype,native", [("uint8", True), ("int16", True), ("int32", False), ("float32", False)])
def test_only_small_unscaled_integers_stay_native(tmp_path, dtype, native):
    data = np.random.default_rng(0).integers(0, 250, (9, 8, 7)).astype(dtype)
    path = tmp_path / "v.nii.gz"
    nifti.save_nifti(nib.Nifti1Image(data, np.diag([-0.8, 0.8, 2.0, 1.0])), path)
    with pytest.warns(nifti.HUWarning):  # the same warning as read_image gives
        image, _ = nifti.read_image_native(path)
    assert (image.dtype == np.dtype(dtype)) if native else image.dtype == np.float32
    with pytest.warns(nifti.HUWarning):
        np.testing.assert_array_equal(image, nifti.read_image(path)[0])


def test_real_int16_ct_reads_and_preprocesses_as_the_float32_read():
    path = REAL / "totalsegmentator-example" / "example_ct_sm.nii.gz"
    if not path.exists():
        pytest.skip(f"real CT not available at {path} (set LIVSEG_REAL_DATA)")
    native, geometry = nifti.read_image_native(path)
    reference, _ = nifti.read_image(path)
    assert native.dtype.kind == "i"
    np.testing.assert_array_equal(native, reference)
    assert_preprocesses_alike(native, reference, geometry.spacing)


def test_predict_file_writes_the_same_label_map_from_either_read(synthetic_ct, tmp_path):
    liver = stage("liver", threshold_model(0.1), {**EXACT, "inplane_factor": 2})
    tumor = stage("tumor", threshold_model(0.6), {**EXACT, "inplane_factor": 2})
    predictor = Predictor(liver, tumor)
    native, record = predictor.predict_file(synthetic_ct, tmp_path / "native.nii.gz")
    reference, _ = predictor.predict_file(synthetic_ct, tmp_path / "float.nii.gz", reader=nifti.read_image)
    np.testing.assert_array_equal(native.labels, reference.labels)
    assert native.labels.any() and record["label_voxels"]["liver"] > 0
    assert (nib.load(tmp_path / "native.nii.gz").get_fdata() == nib.load(tmp_path / "float.nii.gz").get_fdata()).all()
