"""Statistics without ground truth: volumes, diameters, centroids in world coordinates, files."""

import csv
import itertools
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from livseg_jax.data import nifti
from livseg_jax.inference import statistics as st
from livseg_jax.metrics import DEFAULT_LESION_CONNECTIVITY, lesion_detection

# Flipped (x and y run towards the patient's left / posterior), oblique-free, 2 mm slices.
AFFINE = np.array([[-1.0, 0, 0, 10.0], [0, -1.0, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])


def _read_back(tmp_path, disk_labels, disk_image):
    """Returns (internal labels, internal image, geometry) after a NIfTI round trip with AFFINE."""
    nib.save(nib.Nifti1Image(disk_image.astype(np.float32), AFFINE), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(disk_labels.astype(np.uint8), AFFINE), tmp_path / "seg.nii.gz")
    image, geometry = nifti.read_image(tmp_path / "ct.nii.gz")
    labels, _ = nifti.read_label(tmp_path / "seg.nii.gz", expected=geometry)
    return labels, image, geometry


def _uniform_axis(n: int, spacing: float) -> float:
    """Returns sqrt(20 var) of n equally spaced voxel centres (the discrete uniform variance)."""
    return float(np.sqrt(20.0 * spacing**2 * (n * n - 1) / 12.0))


@pytest.mark.filterwarnings("ignore::UserWarning")  # the constructed CT is not HU-like
def test_box_lesions_give_known_volume_diameter_axis_and_world_centroid(tmp_path):
    disk = np.zeros((20, 16, 10), np.uint8)  # (i, j, k) = (x, y, z) on disk
    disk[2:18, 2:14, 1:9] = 1
    disk[4:10, 3:7, 2:5] = 2  # lesion A: 6 x 4 x 3 voxels (1 x 1 x 2 mm)
    disk[14, 10, 6] = 2  # lesion B: one voxel, far from A
    hu = np.full(disk.shape, 60.0)
    hu[disk == 2] = 20.0
    hu[14, 10, 6] = -5.0
    labels, image, geometry = _read_back(tmp_path, disk, hu)
    stats = st.case_statistics(labels, image, geometry.affine_dhw)

    assert stats["number_of_lesions"] == 2
    assert stats["liver_volume_ml"] == pytest.approx(16 * 12 * 8 * 2 / 1000)
    assert stats["tumour_volume_ml"] == pytest.approx((72 + 1) * 2 / 1000)
    assert stats["tumour_burden_percent"] == pytest.approx(100 * 73 / (16 * 12 * 8), abs=1e-4)
    a, b = stats["lesions"]  # numbered by decreasing volume
    assert (a["lesion"], a["voxels"], b["voxels"]) == (1, 72, 1)
    assert a["volume_ml"] == pytest.approx(0.144)
    assert a["longest_axial_diameter_mm"] == pytest.approx(np.hypot(6, 4), abs=1e-4)  # edge to edge
    assert b["longest_axial_diameter_mm"] == pytest.approx(np.sqrt(2), abs=1e-4)
    # Longest spread: x (6 voxels x 1 mm) vs z (3 x 2 mm): sqrt(20 * 35/12) > sqrt(20 * 4 * 8/12).
    assert a["major_axis_mm"] == pytest.approx(_uniform_axis(6, 1.0), abs=1e-4)
    assert b["major_axis_mm"] == 0.0
    centre = AFFINE @ [6.5, 4.5, 3.0, 1.0]  # mean disk index of lesion A through the file's affine
    assert a["centroid_ras_mm"] == pytest.approx(centre[:3].tolist(), abs=1e-4)
    assert a["centroid_lps_mm"] == pytest.approx([-centre[0], -centre[1], centre[2]], abs=1e-4)
    assert b["centroid_ras_mm"] == pytest.approx((AFFINE @ [14, 10, 6, 1])[:3].tolist(), abs=1e-4)
    assert (a["mean_hu"], b["mean_hu"]) == (pytest.approx(20.0), pytest.approx(-5.0))


def test_lesions_use_the_metrics_neighbourhood_and_are_numbered_by_volume():
    tumour = np.zeros((6, 8, 8), bool)
    tumour[1, 1, 1] = tumour[2, 2, 2] = True  # corner neighbours: one lesion for 26-connectivity
    tumour[4, 4:7, 4:7] = True  # the larger lesion
    lesions, n = st.lesion_components(tumour)
    assert DEFAULT_LESION_CONNECTIVITY == 3 and n == 2
    assert lesions[4, 5, 5] == 1 and lesions[1, 1, 1] == lesions[2, 2, 2] == 2
    assert lesion_detection(tumour, tumour, None)["n_true"] == n  # the evaluation counts the same
    assert st.lesion_components(tumour, connectivity=1)[1] == 3


@pytest.mark.parametrize("seed", range(3))
def test_feret_diameter_matches_all_corner_pairs(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((7, 9)) < 0.3
    mask[3, 4] = True
    spacing = (0.7, 1.3)
    rows, cols = np.nonzero(mask)
    corners = [((r + dr) * spacing[0], (c + dc) * spacing[1])
               for r, c in zip(rows, cols, strict=True) for dr, dc in itertools.product((0, 1), repeat=2)]
    pts = np.array(corners)
    brute = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max()
    assert st.feret_diameter_2d(mask, spacing) == pytest.approx(brute)
    volume = np.zeros((3, *mask.shape), bool)
    volume[1] = mask
    volume[2, 0, 0] = True  # a smaller slice does not win
    assert st.longest_axial_diameter(volume, spacing) == pytest.approx(brute)


def test_no_liver_no_tumour_gives_zeros_and_a_header_only_csv(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    stats = st.case_statistics(labels, np.zeros(labels.shape), np.eye(4))
    assert (stats["liver_volume_ml"], stats["tumour_burden_percent"], stats["lesions"]) == (0.0, 0.0, [])
    _, csv_path = st.write_statistics(tmp_path / "s.json", tmp_path / "s.csv", "c", stats)
    assert csv_path.read_text().splitlines() == [",".join(("case_id", *st.LESION_COLUMNS))]
    with pytest.raises(ValueError, match="one shape"):
        st.case_statistics(labels, np.zeros((4, 5, 7)), np.eye(4))


def test_json_and_csv_hold_the_same_lesions(tmp_path):
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[:, 1:5, 1:6] = 1
    labels[1:3, 2:4, 2:4] = 2
    labels[4, 1, 5] = 2
    stats = st.case_statistics(labels, np.arange(labels.size, dtype=float).reshape(labels.shape), np.eye(4))
    json_path, csv_path = st.write_statistics(tmp_path / "s.json", tmp_path / "s.csv", "case-7", stats)
    saved = json.loads(json_path.read_text())
    rows = list(csv.DictReader(csv_path.open()))
    assert saved["case_id"] == "case-7" and len(rows) == saved["number_of_lesions"] == 2
    for row, lesion in zip(rows, saved["lesions"], strict=True):
        assert float(row["volume_ml"]) == lesion["volume_ml"]
        assert [float(row[f"centroid_lps_{a}_mm"]) for a in "xyz"] == lesion["centroid_lps_mm"]
        assert float(row["mean_hu"]) == lesion["mean_hu"]


def test_overlay_numbers_the_predicted_lesions():
    from livseg_jax.visualize import render_overlay

    labels = np.zeros((4, 12, 12), np.uint8)
    labels[:, 2:10, 2:10] = 1
    labels[1, 3:6, 3:6] = 2
    labels[1, 8, 8] = 2
    fig = render_overlay(np.zeros(labels.shape, np.float32), (1, 1, 1), labels, number_lesions=True)
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"1", "2"} <= texts
    given = render_overlay(np.zeros(labels.shape, np.float32), (1, 1, 1), labels, number_lesions=True,
                           lesions=st.lesion_components(labels == 2)[0])  # predict's map, computed once
    assert sorted(t.get_text() for ax in given.axes for t in ax.texts) == sorted(
        t.get_text() for ax in fig.axes for t in ax.texts)
    plain = render_overlay(np.zeros(labels.shape, np.float32), (1, 1, 1), labels)
    assert not {"1", "2"} & {t.get_text() for ax in plain.axes for t in ax.texts}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_predict_writes_the_statistics_beside_the_label_map(tmp_path):
    from livseg_jax.data import nifti
    from livseg_jax.inference.folder import Job
    from livseg_jax.predict import parse_args, write_other_outputs

    disk = np.zeros((12, 10, 6), np.uint8)
    disk[1:11, 1:9, 1:5] = 1
    disk[3:6, 3:5, 2:4] = 2
    labels, _, _ = _read_back(tmp_path, disk, np.where(disk == 2, 30.0, 80.0))
    image, geometry = nifti.read_image(tmp_path / "ct.nii.gz")
    job = Job("ct", tmp_path / "ct.nii.gz", tmp_path / "out" / "ct_seg.nii.gz")
    extra = write_other_outputs(job, labels, image, geometry, reader=None, dicom_paths={}, statistics=True)
    files = [pathlib.Path(f) for f in extra["statistics"]]
    assert [f.name for f in files] == ["ct_seg_statistics.json", "ct_seg_statistics.csv"]
    saved = json.loads(files[0].read_text())
    assert saved["number_of_lesions"] == 1 and saved["lesions"][0]["mean_hu"] == pytest.approx(30.0)
    assert saved["lesions"][0]["volume_ml"] == pytest.approx(3 * 2 * 2 * 2 / 1000)
    assert parse_args(["--liver", "run", "-i", "ct.nii.gz", "-o", "out", "--statistics"]).statistics


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_statistics_and_png_label_the_lesions_once_and_number_them_alike(tmp_path, monkeypatch):
    from livseg_jax import visualize
    from livseg_jax.inference.folder import Job
    from livseg_jax.predict import _save_overlay, write_other_outputs

    labels = np.zeros((6, 16, 16), np.uint8)
    labels[:, 2:14, 2:14] = 1
    labels[2, 3:6, 3:6] = 2  # lesion 1 (9 voxels)
    labels[3, 10, 10] = 2  # lesion 2 (1 voxel)
    image = np.where(labels == 2, 30.0, 80.0).astype(np.float32)
    geometry = nifti.Geometry(affine=AFFINE, disk_shape=(16, 16, 6), ornt=np.array([[0, 1], [1, 1], [2, 1]]),
                              header=nib.Nifti1Header())
    calls = []
    real = st.label_components
    monkeypatch.setattr(st, "label_components", lambda *a, **k: calls.append(1) or real(*a, **k))
    rendered = []
    monkeypatch.setattr(visualize, "render_overlay",
                        lambda *a, **k: rendered.append(k["lesions"]) or visualize.Figure())
    job = Job("ct", tmp_path / "ct.nii.gz", tmp_path / "ct_seg.nii.gz", png=tmp_path / "ct_seg.png")
    maps: dict = {}
    write_other_outputs(job, labels, image, geometry, reader=None, dicom_paths={}, statistics=True, lesion_maps=maps)
    _save_overlay(job.png, image, (1, 1, 1), labels, "ct", number_lesions=True, lesion_maps=maps)
    assert len(calls) == 1 and not maps  # labelled once; the map handed over and released
    np.testing.assert_array_equal(rendered[0], st.lesion_components(labels == 2)[0])  # the reference numbering
    stats = json.loads((tmp_path / "ct_seg_statistics.json").read_text())
    assert [lesion["voxels"] for lesion in stats["lesions"]] == [9, 1]
