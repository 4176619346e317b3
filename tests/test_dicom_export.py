"""DICOM-SEG and RTSTRUCT outputs (`livseg_jax.inference.dicom_export`) read back independently."""

import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.path import Path as Polygon
from scipy import ndimage
from test_dicom import ct_series, write_series

from livseg_jax.data import dicom
from livseg_jax.inference import dicom_export

hd = pytest.importorskip("highdicom")
pytest.importorskip("rt_utils")

N, ROWS, COLS = 6, 20, 18


def constructed_labels():
    """Returns a (slices, rows, cols) 0/1/2 label map: a liver blob over four slices, a tumour inside."""
    z, r, c = np.meshgrid(np.arange(N), np.arange(ROWS), np.arange(COLS), indexing="ij")
    liver = (z >= 1) & (z <= 4) & ((r - 9) ** 2 / 36 + (c - 8) ** 2 / 25 <= 1)
    liver &= ~((z == 2) & (r < 6))  # not convex on one slice
    tumour = liver & (z >= 2) & (z <= 3) & (abs(r - 10) <= 1) & (abs(c - 7) <= 2)
    labels = liver.astype(np.uint8)
    labels[tumour] = 2
    return labels


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Returns (series, labels, {type: path}) after writing both DICOM outputs for a flipped series."""
    root = tmp_path_factory.mktemp("dicom_out")
    hu = np.full((N, ROWS, COLS), 40, np.int16)
    series = dicom.read_dicom_series(write_series(root / "ct", ct_series(hu)))
    labels = constructed_labels()
    paths = {"dicom_seg": root / "case_seg.dcm", "rtstruct": root / "case_seg_rtstruct.dcm"}
    assert dicom_export.write_dicom_outputs(labels, series, paths) == list(paths.values())
    assert sorted(p.name for p in root.iterdir()) == ["case_seg.dcm", "case_seg_rtstruct.dcm", "ct"]  # no temps
    return series, labels, paths


def test_dicom_seg_reads_back_exactly_and_references_the_series(written):
    series, labels, paths = written
    seg = hd.seg.segread(paths["dicom_seg"])
    first = series.datasets[0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    assert [str(seg.get_segment_description(i).segmented_property_type.value) for i in (1, 2)] == [
        "10200004", "108369006"]
    assert [seg.get_segment_description(i).segmented_property_category.value for i in (1, 2)] == [
        "91723000", "49755003"]
    uids = [ds.SOPInstanceUID for ds in series.datasets]
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                             ignore_spatial_locations=False, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(back[..., 0], labels >= 1)
    np.testing.assert_array_equal(back[..., 1], labels == 2)


def _voxel_points(contour, series, k):
    """Returns contour points as (row, col) indices on slice k, checking they lie in its plane."""
    lps = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
    to_voxel = np.linalg.inv(_lps_affine(series))
    ijk = (to_voxel @ np.c_[lps, np.ones(len(lps))].T).T[:, :3]  # (col, row, slice)
    np.testing.assert_allclose(ijk[:, 2], k, atol=1e-3)
    return ijk[:, [1, 0]]


def _lps_affine(series):
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ series.affine()  # RAS -> LPS


def test_rtstruct_contours_lie_on_mask_boundaries_and_fill_to_the_mask_within_one_voxel(written):
    import pydicom

    series, labels, paths = written
    ds = pydicom.dcmread(paths["rtstruct"])
    first = series.datasets[0]
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == first.StudyInstanceUID
    referenced = ds.ReferencedFrameOfReferenceSequence[0]
    assert referenced.FrameOfReferenceUID == first.FrameOfReferenceUID
    study = referenced.RTReferencedStudySequence[0]
    assert study.RTReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    by_uid = {d.SOPInstanceUID: k for k, d in enumerate(series.datasets)}
    masks = dicom_export.structure_masks(labels)
    rows, cols = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
    centres = np.c_[rows.ravel(), cols.ravel()]
    for roi in ds.ROIContourSequence:
        mask = masks[names[roi.ReferencedROINumber]]
        filled = np.zeros_like(mask)
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            k = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = _voxel_points(contour, series, k)
            np.testing.assert_allclose(points, np.round(points), atol=1e-3)  # through pixel centres
            r, c = np.round(points).astype(int).T
            boundary = mask[k] & ~ndimage.binary_erosion(mask[k])
            assert boundary[r, c].all()
            inside = Polygon(points).contains_points(centres, radius=1e-6) | Polygon(points).contains_points(
                centres, radius=-1e-6)
            on_vertex = (np.abs(centres[:, None, :] - points[None]).max(-1) < 1e-3).any(1)
            filled[k] |= (inside | on_vertex).reshape(ROWS, COLS)
        grow = ndimage.generate_binary_structure(2, 2)[None] * np.array([0, 1, 0])[:, None, None]
        assert mask.any() and filled.any()
        assert not (filled & ~ndimage.binary_dilation(mask, grow)).any()
        assert not (mask & ~ndimage.binary_dilation(filled, grow)).any()
        assert (filled == mask).mean() > 0.97


def test_series_without_frame_of_reference_or_with_non_square_pixels_is_refused(tmp_path):
    hu = np.zeros((3, 8, 8), np.int16)
    no_frame = dicom.read_dicom_series(write_series(tmp_path / "a", ct_series(hu, frame_uid=None)))
    with pytest.raises(ValueError, match="no FrameOfReferenceUID"):
        dicom_export.check_exportable(no_frame, ["dicom_seg"])
    dicom_export.check_exportable(no_frame, ["nifti"])
    oblong = dicom.read_dicom_series(write_series(tmp_path / "b", ct_series(hu, spacing=(0.7, 0.9))))
    with pytest.raises(ValueError, match="square pixels"):
        dicom_export.check_exportable(oblong, ["rtstruct"])
    dicom_export.check_exportable(oblong, ["dicom_seg"])


def test_rtstruct_of_a_prediction_without_liver_is_refused_and_nothing_is_written(tmp_path):
    series = dicom.read_dicom_series(write_series(tmp_path / "ct", ct_series(np.zeros((3, 8, 8), np.int16))))
    paths = {"dicom_seg": tmp_path / "a.dcm", "rtstruct": tmp_path / "b.dcm"}
    with pytest.raises(ValueError, match="holds no liver"):
        dicom_export.write_dicom_outputs(np.zeros((3, 8, 8), np.uint8), series, paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_output_types_parse_comma_separated_and_repeated():
    assert dicom_export.parse_output_types(["nifti,dicom_seg", "rtstruct", "nifti"]) == [
        "nifti", "dicom_seg", "rtstruct"]
    with pytest.raises(ValueError, match="unknown type 'seg'"):
        dicom_export.parse_output_types(["seg"])


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
@pytest.mark.parametrize("kind", ["dicom_seg", "rtstruct"])
def test_outputs_pass_dciodvfy(written, kind):
    done = subprocess.run(["dciodvfy", str(written[2][kind])], capture_output=True, text=True, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


@pytest.mark.real_data
def test_real_ircad_slices_need_a_frame_of_reference_and_with_one_give_an_exact_seg(shared_data, tmp_path):
    import zipfile

    import pydicom

    archive = shared_data / "3Dircadb1" / "3Dircadb1.17" / "PATIENT_DICOM.zip"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent")
    folder = tmp_path / "subset"
    folder.mkdir()
    with zipfile.ZipFile(archive) as zf:
        for i in range(40, 44):  # four neighbouring slices of the real series, headers untouched
            (folder / f"image_{i}").write_bytes(zf.read(f"PATIENT_DICOM/image_{i}"))
    series = dicom.read_dicom_series(folder)
    with pytest.raises(ValueError, match="no FrameOfReferenceUID"):  # the dataset's files have none
        dicom_export.check_exportable(series, ["dicom_seg"])
    frame = pydicom.uid.generate_uid()
    for ds in series.datasets:
        ds.FrameOfReferenceUID = frame
    labels = np.zeros(series.pixels.shape, np.uint8)
    labels[series.pixels > 100] = 1  # dense tissue and bone: a real-looking irregular mask
    labels[1:3, 200:240, 250:300] = 2
    path = tmp_path / "real_seg.dcm"
    dicom_export.write_dicom_outputs(labels, series, {"dicom_seg": path})
    seg = hd.seg.segread(path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.datasets[0].SeriesInstanceUID
    back = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in series.datasets], segment_numbers=[1, 2])
    np.testing.assert_array_equal(back[..., 0], labels >= 1)
    np.testing.assert_array_equal(back[..., 1], labels == 2)
