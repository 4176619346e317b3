"""3D-IRCADb importer: small hand-made DICOM patients, and the real patient 1.17 when present."""

import io
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from livseg_jax.config import base_config
from livseg_jax.data import ircadb, nifti, preprocess
from livseg_jax.data.nifti import DataError

pydicom = pytest.importorskip("pydicom")

ROWS, COLS, N = 6, 8, 5
SPACING = (0.7, 0.8)  # PixelSpacing: between rows, between columns
STEP = 2.5
ORIGIN = np.array([-10.0, 20.0, 100.0])  # LPS of the first voxel of the lowest slice


def _dicom_bytes(pixels: np.ndarray, z_index: int, slope=1.0, intercept=0.0) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    unsigned = pixels.dtype == np.uint8
    ds.BitsAllocated = ds.BitsStored = 8 if unsigned else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0 if unsigned else 1
    ds.PixelData = pixels.tobytes()
    ds.PixelSpacing = list(SPACING)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = list(ORIGIN + [0, 0, STEP * z_index])
    ds.InstanceNumber = z_index
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _truth():
    """Returns (HU (N, ROWS, COLS), liver, tumour1, tumour2, cyst) in slice-position order."""
    z, r, c = np.meshgrid(np.arange(N), np.arange(ROWS), np.arange(COLS), indexing="ij")
    hu = (-1000 + 100 * z + 10 * r + c).astype(np.int16)  # every voxel says where it belongs
    liver = (r >= 1) & (r <= 4) & (c >= 2) & (c <= 6)
    tumour1 = (z == 2) & (r == 2) & (c == 3)
    tumour2 = (z == 3) & (r == 4) & (c >= 6)  # reaches outside the liver at c == 7
    cyst = (z == 1) & (r == 3) & (c == 5)
    return hu, liver, tumour1, tumour2, cyst


def _patient_files():
    """Returns {archive name: {member path: bytes}} for one patient, slice files shuffled."""
    hu, liver, t1, t2, cyst = _truth()
    order = [3, 0, 4, 1, 2]  # file image_i holds slice order[i]: names do not follow positions
    patient = {
        f"PATIENT_DICOM/image_{i}": _dicom_bytes((hu[k] + 1024).astype(np.int16), k, 1.0, -1024.0)
        for i, k in enumerate(order)
    }
    masks = {}
    for name, m in (("liver", liver), ("livertumor1", t1), ("livertumor02", t2), ("livercyst", cyst)):
        for i, k in enumerate(order):
            masks[f"MASKS_DICOM/{name}/image_{i}"] = _dicom_bytes(m[k].astype(np.uint8) * 255, k)
    return {"PATIENT_DICOM": patient, "MASKS_DICOM": masks}


def _make_patient(folder, zipped: bool):
    folder.mkdir(parents=True)
    for archive, members in _patient_files().items():
        if zipped:
            with zipfile.ZipFile(folder / f"{archive}.zip", "w") as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        else:
            for name, data in members.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("zipped", [True, False])
def test_import_orders_slices_by_position_and_rescales_to_hu(tmp_path, zipped):
    patient = _make_patient(tmp_path / "3Dircadb1.4", zipped)
    (report,) = ircadb.import_ircadb(patient, tmp_path / "out", log=None)
    img = nib.load(tmp_path / "out" / "volume-4.nii.gz")
    assert img.get_data_dtype() == np.int16
    hu, liver, t1, t2, _ = _truth()
    np.testing.assert_array_equal(np.asarray(img.dataobj), hu.transpose(2, 1, 0))
    assert report.shape == (COLS, ROWS, N)
    np.testing.assert_allclose(report.spacing, (SPACING[1], SPACING[0], STEP))


def test_affine_maps_voxels_to_dicom_positions_in_ras(tmp_path):
    patient = _make_patient(tmp_path / "p7", zipped=True)
    ircadb.import_ircadb(patient, tmp_path / "out", log=None)
    affine = nib.load(tmp_path / "out" / "volume-7.nii.gz").affine
    for i, j, k in [(0, 0, 0), (7, 5, 4), (3, 2, 1)]:
        lps = ORIGIN + np.array([i * SPACING[1], j * SPACING[0], k * STEP])
        ras = affine @ np.array([i, j, k, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)


def test_labels_merge_livertumor_masks_inside_liver_and_report_it(tmp_path):
    patient = _make_patient(tmp_path / "3Dircadb1.2", zipped=True)
    (report,) = ircadb.import_ircadb(patient, tmp_path / "out", log=None)
    lab = np.asarray(nib.load(tmp_path / "out" / "segmentation-2.nii.gz").dataobj).transpose(2, 1, 0)
    _, liver, t1, t2, cyst = _truth()
    expected = liver.astype(np.uint8)
    expected[(t1 | t2) & liver] = 2
    np.testing.assert_array_equal(lab, expected)
    assert [n for n, _ in report.tumour_masks] == ["livertumor1", "livertumor02"]
    assert report.tumour_voxels_dropped == int((t2 & ~liver).sum()) > 0
    assert report.ignored_masks == ["livercyst"]
    assert "livertumor1 (1 voxels), livertumor02 (2 voxels)" in report.summary()


def test_tumor_masks_option_chooses_the_folders(tmp_path, capsys):
    patient = _make_patient(tmp_path / "3Dircadb1.3", zipped=False)
    status = ircadb.main([str(patient), str(tmp_path / "out"), "--tumor-masks", "LiverCyst"])
    assert status == 0
    out = capsys.readouterr().out
    assert "tumour (label 2) <- livercyst (1 voxels)" in out and "not used: livertumor1, livertumor02" in out
    lab = np.asarray(nib.load(tmp_path / "out" / "segmentation-3.nii.gz").dataobj).transpose(2, 1, 0)
    _, _, _, _, cyst = _truth()
    np.testing.assert_array_equal(lab == 2, cyst)


def test_folder_of_patients_is_converted_in_natural_order(tmp_path):
    for n in (10, 9):
        _make_patient(tmp_path / "src" / f"3Dircadb1.{n}", zipped=True)
    (tmp_path / "src" / "notes").mkdir()
    reports = ircadb.import_ircadb(tmp_path / "src", tmp_path / "out", log=None)
    assert [r.image_path.name for r in reports] == ["volume-9.nii.gz", "volume-10.nii.gz"]


def test_mask_on_another_grid_is_an_error_naming_it(tmp_path):
    patient = _make_patient(tmp_path / "p1", zipped=False)
    extra = patient / "MASKS_DICOM" / "livertumor1" / "image_9"
    extra.write_bytes(_dicom_bytes(np.zeros((ROWS, COLS), np.uint8), N))  # one slice too many
    with pytest.raises(DataError, match=r"livertumor1: mask 'livertumor1' does not lie on the image grid"):
        ircadb.import_ircadb(patient, tmp_path / "out", log=None)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_corrupt_slice_error_names_the_zip_member(tmp_path):
    patient = _make_patient(tmp_path / "p1", zipped=True)
    with zipfile.ZipFile(patient / "PATIENT_DICOM.zip", "a") as zf:
        zf.writestr("PATIENT_DICOM/image_99", b"garbage")
    with pytest.raises(DataError, match=r"PATIENT_DICOM\.zip:PATIENT_DICOM/image_99: cannot read"):
        ircadb.import_ircadb(patient, tmp_path / "out", log=None)


def test_missing_pydicom_gives_a_clear_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    patient = _make_patient(tmp_path / "p1", zipped=True)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    assert ircadb.main([str(patient), str(tmp_path / "out")]) == 1
    assert "livseg_jax[dicom]" in capsys.readouterr().err


# ------------------------------------------------------------------- the real 3D-IRCADb patient 1.17


@pytest.fixture(scope="session")
def ircad17(shared_data, tmp_path_factory):
    """Converts 3D-IRCADb-01 patient 1.17 once per session; returns its import report."""
    src = shared_data / "3Dircadb1" / "3Dircadb1.17"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    (report,) = ircadb.import_ircadb(src, tmp_path_factory.mktemp("ircad"), log=None)
    return report


@pytest.mark.real_data
def test_real_ircad_case_has_expected_grid_hu_liver_and_two_tumours(ircad17):
    img = nib.load(ircad17.image_path)
    assert img.shape == (512, 512, 119)
    np.testing.assert_allclose(img.header.get_zooms(), (0.743, 0.743, 1.6), atol=1e-3)
    case = nifti.read_case(ircad17.image_path, ircad17.label_path)
    assert case.image.min() <= -1000 and case.image.max() < 4000  # air present, in HU
    lab = case.label
    assert 50 < float(np.median(case.image[lab == 1])) < 200  # liver parenchyma HU
    assert (lab >= 1).sum() > 10**6
    _, n_tumours = ndimage.label(lab == 2)
    assert n_tumours == 2
    assert ircad17.tumour_voxels_dropped == 0
    assert [n for n, _ in ircad17.tumour_masks] == ["livertumor1", "livertumor2"]
    # Checked against the dataset's own masks, read independently (ordered by InstanceNumber).
    zf = zipfile.ZipFile(ircad17.patient / "MASKS_DICOM.zip")
    raw = {}
    for name in ("liver", "livertumor1", "livertumor2"):
        slices = [
            pydicom.dcmread(io.BytesIO(zf.read(n)))
            for n in zf.namelist()
            if n.startswith(f"MASKS_DICOM/{name}/") and not n.endswith("/")
        ]
        slices.sort(key=lambda ds: int(ds.InstanceNumber))
        raw[name] = np.stack([ds.pixel_array.T for ds in slices], axis=-1) > 0  # (cols, rows, slices)
    lab_disk = np.asarray(nib.load(ircad17.label_path).dataobj)
    np.testing.assert_array_equal(lab_disk >= 1, raw["liver"])
    np.testing.assert_array_equal(lab_disk == 2, (raw["livertumor1"] | raw["livertumor2"]) & raw["liver"])
    assert not ((lab_disk == 2) & ~raw["liver"]).any()


@pytest.mark.real_data
def test_real_ircad_preprocess_restore_round_trip_keeps_grid_and_liver(ircad17, tmp_path):
    case = nifti.read_case(ircad17.image_path, ircad17.label_path)
    image, label, record = preprocess.preprocess(
        case.image, case.spacing, base_config().preprocess, case.label
    )
    assert image.shape[1] < case.image.shape[1] // 2 + 1 and record.spacing[1] == pytest.approx(
        2 * 0.743, 1e-4
    )
    back = preprocess.restore(label, record.to_dict())
    out = nifti.write_label_map(back, case.geometry, tmp_path / "restored.nii.gz")
    restored, truth = nib.load(out), nib.load(ircad17.label_path)
    assert restored.shape == truth.shape
    np.testing.assert_array_equal(restored.affine, truth.affine)
    r, t = np.asarray(restored.dataobj) >= 1, np.asarray(truth.dataobj) >= 1
    dice = 2 * (r & t).sum() / (r.sum() + t.sum())
    assert dice >= 0.99
