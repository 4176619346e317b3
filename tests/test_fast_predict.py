"""Fast prediction paths equal their references: reading, slab-parallel preprocessing, the folder pipeline."""

import json
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest
from test_two_stage import EXACT, phantom, stage, threshold_model

from livseg_jax.data import nifti, regions, slabs
from livseg_jax.data import preprocess as pre
from livseg_jax.data.regions import largest_component_box
from livseg_jax.data.synthetic import make_phantom, write_phantom
from livseg_jax.inference.components import bucket_size, largest_component_device
from livseg_jax.inference.folder import Job, device_predictors, predict_cases
from livseg_jax.inference.memory import memory_record, reset_host_peak
from livseg_jax.inference.two_stage import Predictor

REAL = pathlib.Path(os.environ.get("LIVSEG_REAL_DATA", pathlib.Path(__file__).parents[1] / ".." / "shared" / "data"))


def nibabel_reference(path):
    """Returns the volume the way read_image did before its fast path: nibabel's float32, reoriented."""
    img = nifti.load_image(path)
    geometry = nifti.geometry_of(img, path)
    return nifti.to_internal(nifti.read_voxels(img, path, np.float32), geometry)


def write(path, data, affine, slope=None):
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nifti.save_nifti(img, path)
    return path


@pytest.fixture(autouse=True)
def three_threads(monkeypatch):
    """Splits slab work over 3 threads even on a 2-core runner, so the parallel paths run."""
    monkeypatch.setenv("LIVSEG_THREADS", "3")


@pytest.mark.filterwarnings("ignore::livseg_jax.data.nifti.HUWarning")
@pytest.mark.parametrize("dtype", ["int16", "uint8", "int32", "uint16", "float32"])
def test_read_image_equals_nibabel_for_every_voxel_type_and_a_flipped_orientation(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = rng.integers(-1024 if dtype[0] != "u" else 0, 250, (17, 13, 23)).astype(dtype)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-like: x and y flipped on the way in
    path = write(tmp_path / "v.nii.gz", data, affine)
    image, _ = nifti.read_image(path)
    assert image.dtype == np.float32 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, nibabel_reference(path))


def test_scaled_and_permuted_files_take_nibabels_values(tmp_path):
    data = np.random.default_rng(1).integers(-500, 500, (9, 11, 14)).astype(np.int16)
    affine = np.array([[0, 0, 2.0, 0], [0, -0.7, 0, 0], [0.7, 0, 0, 0], [0, 0, 0, 1]])  # slices on disk axis 0
    path = write(tmp_path / "v.nii.gz", data, affine, slope=(0.5, -3.0))
    image, _ = nifti.read_image(path)
    np.testing.assert_array_equal(image, nibabel_reference(path))


def test_reading_a_synthetic_ct_equals_nibabel(tmp_path):
    hu, labels = make_phantom((40, 36, 20), (1.5, 1.5, 3.0), seed=2)
    write_phantom(hu, labels, (1.5, 1.5, 3.0), tmp_path / "volume-0.nii.gz", tmp_path / "segmentation-0.nii.gz")
    image, _ = nifti.read_image(tmp_path / "volume-0.nii.gz")
    np.testing.assert_array_equal(image, nibabel_reference(tmp_path / "volume-0.nii.gz"))


@pytest.mark.parametrize("name", ["totalsegmentator-example/example_ct_sm.nii.gz", "lits-sample/volume-117.nii.gz"])
def test_real_cts_read_and_preprocess_as_the_one_pass_reference(name):
    path = REAL / name
    if not path.exists():
        pytest.skip(f"real CT not available at {path} (set LIVSEG_REAL_DATA)")
    image, geometry = nifti.read_image(path)
    np.testing.assert_array_equal(image, nibabel_reference(path))
    settings = pre.PreprocessSettings(**{**EXACT, "inplane_factor": 2, "target_slice_spacing": 2.0})
    got, _, record = pre.preprocess(image, geometry.spacing, settings)
    np.testing.assert_array_equal(got, one_pass_reference(image, geometry.spacing, settings, record))


def one_pass_reference(image, spacing, settings, record):
    """Returns the fixed-factor preprocessed image computed by the whole-volume functions, one step after another."""
    stride = 2 if min(image.shape[1:]) >= 64 else 1
    _, box = largest_component_box(pre._threshold_open(image[:, ::stride, ::stride], settings.body_threshold_hu),
                                   with_mask=False)
    rows, cols = (slice(max(0, stride * b.start - (stride - 1)), min(n, stride * b.stop + (stride - 1)))
                  for b, n in zip(box[1:], image.shape[1:], strict=True))
    assert (box[0], rows, cols) == record.crop_bbox
    crop = image[record.crop_bbox]
    if record.slice_step != 1.0:
        crop = pre.resample_slices_image(crop, record.slice_step)
    pooled, _ = pre.downsample_image_inplane(crop, settings.inplane_factor)
    return pre.window(pooled, settings.hu_min, settings.hu_max, settings.hu_scale)


@pytest.mark.parametrize("factor, slice_spacing", [(2, 0.0), (3, 4.0), (1, 1.7)])
def test_slab_parallel_preprocessing_equals_one_pass(factor, slice_spacing, monkeypatch):
    rng = np.random.default_rng(3)
    image = phantom() + rng.normal(0, 30, phantom().shape).astype(np.float32)  # odd sizes: padding
    image = image[:, :39, :47]
    settings = pre.PreprocessSettings(**{**EXACT, "inplane_factor": factor, "target_slice_spacing": slice_spacing})
    label = (image > 100).astype(np.uint8)
    got, got_label, record = pre.preprocess(image, (2.5, 1.0, 1.0), settings, label)
    np.testing.assert_array_equal(got, one_pass_reference(image, (2.5, 1.0, 1.0), settings, record))
    monkeypatch.setenv("LIVSEG_THREADS", "1")  # the serial run of the same code
    serial, serial_label, serial_record = pre.preprocess(image, (2.5, 1.0, 1.0), settings, label)
    np.testing.assert_array_equal(got, serial)
    np.testing.assert_array_equal(got_label, serial_label)
    assert record == serial_record


def test_parallel_slabs_covers_every_index_once_and_refuses_a_bad_thread_count(monkeypatch):
    seen = []
    slabs.parallel_slabs(lambda a, b: seen.extend(range(a, b)), 37, threads=4)
    assert sorted(seen) == list(range(37))
    monkeypatch.setenv("LIVSEG_THREADS", "zero")
    with pytest.raises(ValueError, match="LIVSEG_THREADS"):
        slabs.slab_threads()


# ------------------------------------------------------------------------------ folder pipeline


def write_cases(folder, count):
    paths = []
    for i in range(count):
        ct = phantom()
        ct[ct == 250.0] += 20.0 * i  # every case a little different, all of one shape: compiled once
        path = folder / f"volume-{i}.nii.gz"
        affine = np.diag([1.0, 1.0, 2.5, 1.0])
        img = nib.Nifti1Image(np.ascontiguousarray(ct.transpose(2, 1, 0)).astype(np.int16), affine)
        if i == 1:  # a header anomaly: its warning must reach this case's record, from a reader thread
            img.set_sform(affine, code=1)
            img.set_qform(affine + np.eye(4)[0:1].T @ np.array([[0, 0, 0, 7.0]]), code=1)
        nifti.save_nifti(img, path)
        paths.append(path)
    return paths


def threshold_predictor():
    return Predictor(stage("liver", threshold_model(0.5)), stage("tumor", threshold_model(1.1)))


def test_folder_pipeline_on_two_workers_equals_one_case_at_a_time(tmp_path):
    paths = write_cases(tmp_path, 3)
    bad = tmp_path / "volume-9.nii.gz"
    bad.write_bytes(b"not a gzip file")
    predictor = threshold_predictor()
    reference = {}
    for path in paths:
        _, record = predictor.predict_file(path, tmp_path / f"ref-{path.name}")
        reference[path.name] = nib.load(tmp_path / f"ref-{path.name}").get_fdata()
        assert record["memory"]["host_peak_rss_gib"] > 0 and record["memory"]["host_peak_scope"] == "this case"
    out = tmp_path / "out"
    out.mkdir()
    jobs = [Job(p.name, p, out / f"seg-{p.name}") for p in [*paths, bad]]
    seen = []
    workers = device_predictors(predictor) * 2  # two workers sharing one device: the multi-device logic
    outcomes = predict_cases(workers, jobs, seen.append, run_info={"devices": 2}, depth=1)
    assert len(outcomes) == len(seen) == 4
    failed = [o for o in outcomes if o.error is not None]
    assert [o.job.image for o in failed] == [bad] and "not a gzip file" in str(failed[0].error)
    assert not (out / "seg-volume-9.nii.gz").exists()
    for path in paths:
        np.testing.assert_array_equal(nib.load(out / f"seg-{path.name}").get_fdata(), reference[path.name])
        record = json.loads((out / f"seg-{path.name.removesuffix('.nii.gz')}_timings.json").read_text())
        assert record["run"] == {"devices": 2} and record["case_id"] == path.name
        assert set(record["memory"]) >= {"host_peak_rss_gib", "device_peak_gib"}
        assert record["timings_s"]["total"] >= record["timings_s"]["read"] > 0
        assert ("qform and sform disagree" in " ".join(record["warnings"])) == (path.name == "volume-1.nii.gz")


def test_host_peak_reset_follows_a_large_allocation():
    if not reset_host_peak():
        pytest.skip("no /proc/self/clear_refs here")
    before = memory_record()["host_peak_rss_gib"]
    block = np.ones(300 << 20, np.uint8)  # 0.3 GiB touched
    after = memory_record()["host_peak_rss_gib"]
    del block
    assert after - before > 0.25


# ------------------------------------------------------------------- largest component, device


@pytest.mark.parametrize("connectivity", [1, 2, 3])
def test_device_largest_component_equals_scipys_on_random_masks_and_ties(connectivity):
    rng = np.random.default_rng(connectivity)
    for density in (0.3, 0.55):  # many small components; a few large ones
        mask = rng.random((20, 30, 25)) < density
        np.testing.assert_array_equal(largest_component_device(mask, connectivity),
                                      regions.largest_component(mask, connectivity))
    ties = np.zeros((12, 12, 12), bool)
    ties[6:8, 6:8, 6:8] = ties[1:3, 1:3, 1:3] = True  # equal sizes: the first in scan order is kept
    np.testing.assert_array_equal(largest_component_device(ties, connectivity), regions.largest_component(ties))
    assert not largest_component_device(np.zeros((5, 6, 7), bool), connectivity).any()


def test_device_largest_component_on_a_real_liver_with_islands():
    path = REAL / "lits-sample" / "segmentation-117.nii.gz"
    if not path.exists():
        pytest.skip(f"real label map not available at {path} (set LIVSEG_REAL_DATA)")
    labels, _ = nifti.read_label(path)
    liver = labels[::2, ::2, ::2] >= 1  # every 2nd voxel: the same shape, 8x fewer voxels on XLA:CPU
    mask = liver | (np.random.default_rng(0).random(liver.shape) < 0.02)  # and noise islands
    np.testing.assert_array_equal(largest_component_device(mask), regions.largest_component(mask))


@pytest.mark.parametrize("factor, slice_spacing", [(2, 0.0), (3, 4.0)])
def test_restore_equals_upsampling_then_pasting(factor, slice_spacing):
    image = phantom()[:, :39, :47]
    settings = pre.PreprocessSettings(**{**EXACT, "inplane_factor": factor, "target_slice_spacing": slice_spacing})
    _, _, record = pre.preprocess(image, (2.5, 1.0, 1.0), settings)
    labels = np.random.default_rng(4).integers(0, 3, record.shape).astype(np.uint8)
    expected = pre.upsample_labels_inplane(labels, factor, record.crop_shape[1:])
    if record.slice_step != 1.0:
        expected = pre.unresample_slices_labels(expected, record.slice_step, record.crop_shape[0])
    expected = regions.paste_into(expected, record.crop_bbox, image.shape, 0)
    np.testing.assert_array_equal(pre.restore(labels, record), expected)


def test_an_interrupt_stops_the_pipeline_after_the_case_being_written(tmp_path):
    paths = write_cases(tmp_path, 3)
    out = tmp_path / "out"
    out.mkdir()

    def interrupt(outcome):
        raise KeyboardInterrupt

    jobs = [Job(p.name, p, out / f"seg-{p.name}") for p in paths]
    with pytest.raises(KeyboardInterrupt):
        predict_cases(device_predictors(threshold_predictor()), jobs, interrupt)
    names = sorted(p.name for p in out.iterdir())
    # The first case, and possibly one the writer had already begun when the interrupt came (it is
    # completed, never cut): whole cases only (label map + timings), and not all three.
    cases = {n.removesuffix("_timings.json").removesuffix(".nii.gz") for n in names}
    assert 2 <= len(names) <= 4 and len(names) == 2 * len(cases), names
    assert all(f"{c}.nii.gz" in names and f"{c}_timings.json" in names for c in cases), names


def test_bucket_sizes_cover_each_size_within_one_and_a_half_times():
    for n in range(1, 2000):
        size = bucket_size(n)
        assert n <= size <= max(32, 1.5 * n)
    assert len({bucket_size(n) for n in range(1, 2000)}) <= 14
