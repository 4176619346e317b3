"""DICOM series reading (`livseg_jax.data.dicom`): small hand-made series, and the real 3D-IRCADb zip."""

import concurrent.futures
import io
import zipfile

import nibabel as nib
import numpy as np
import pytest

from livseg_jax.data import dicom, ircadb, nifti
from livseg_jax.data.nifti import DataError

pydicom = pytest.importorskip("pydicom")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Oblique-free but flipped: rows run along +y, columns along +x, so the slice normal is -z and
# the slice order is the opposite of the z order.
FLIPPED = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)


def ct_series(hu, *, spacing=(0.8, 0.8), step=2.0, orientation=FLIPPED, origin=(-12.0, 30.0, 80.0),
              study_uid=None, series_uid=None, frame_uid="auto", description="abdomen", drift=(0.0, 0.0, 0.0),
              intercept=-1024.0):
    """Returns CT slice datasets of `hu` (slices along the normal, rows, cols) with complete headers."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid() if frame_uid == "auto" else frame_uid
    col_dir, row_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(col_dir, row_dir)
    out = []
    for k, plane in enumerate(np.asarray(hu)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "P1", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 3, description
        ds.Modality, ds.Manufacturer = "CT", "phantom"
        if frame_uid is not None:
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = list(np.asarray(origin) + k * step * normal + k * np.asarray(drift))
        ds.PixelSpacing, ds.SliceThickness = list(spacing), step
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, intercept, "HU"
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.PixelData = (np.asarray(plane) - intercept).astype(np.int16).tobytes()
        out.append(ds)
    return out


def write_series(folder, datasets, order=None):
    """Writes slices as `image_N` files (N in `order`, so names do not follow positions); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    order = order or list(range(len(datasets)))[::-1]
    for name, k in enumerate(order):
        buf = io.BytesIO()
        datasets[k].save_as(buf, enforce_file_format=True)
        (folder / f"image_{name}").write_bytes(buf.getvalue())
    return folder


def zip_folder(folder, archive):
    """Zips a folder's files under a top folder of the folder's name; returns the archive."""
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"{folder.name}/{p.name}")
    return archive


def phantom(n=5, rows=6, cols=7):
    """Returns int16 HU (n, rows, cols) in which every voxel says where it is."""
    z, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    return (-1000 + 100 * z + 10 * r + c).astype(np.int16)


def test_slices_sorted_along_the_normal_rescaled_and_affine_maps_each_voxel_to_its_position(tmp_path):
    hu = phantom()
    datasets = ct_series(hu, spacing=(0.7, 0.9))
    folder = write_series(tmp_path / "series", datasets, order=[3, 0, 4, 1, 2])
    series = dicom.read_dicom_series(folder)
    np.testing.assert_array_equal(series.pixels, hu)  # RescaleIntercept applied, normal order kept
    affine = series.affine()
    for k in (0, 2, 4):
        ds = datasets[k]
        for r, c in ((0, 0), (5, 6), (2, 3)):
            # DICOM PS3.3 C.7.6.2.1.1: position + column index * column step + row index * row step
            lps = (np.asarray(ds.ImagePositionPatient) + c * ds.PixelSpacing[1] * np.asarray(FLIPPED[:3])
                   + r * ds.PixelSpacing[0] * np.asarray(FLIPPED[3:]))
            np.testing.assert_allclose((affine @ [c, r, k, 1])[:3], LPS_TO_RAS @ lps, atol=1e-6)


def test_zip_reads_like_the_folder_and_predict_geometry_round_trips_to_slice_order(tmp_path):
    hu = phantom()
    folder = write_series(tmp_path / "PATIENT_DICOM", ct_series(hu))
    archive = zip_folder(folder, tmp_path / "PATIENT_DICOM.zip")
    assert dicom.is_dicom_input(folder) and dicom.is_dicom_input(archive)
    a, b = dicom.read_dicom_series(folder), dicom.read_dicom_series(archive)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.affine(), b.affine())
    image, geometry = dicom.image_and_geometry(b)
    np.testing.assert_array_equal(geometry.affine, b.affine())
    np.testing.assert_array_equal(dicom.slice_order(image, geometry), hu)  # internal (D, H, W) and back


def test_nifti_folders_and_empty_folders_are_not_dicom_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nii").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), tmp_path / "nii" / "ct.nii.gz")
    assert not dicom.is_dicom_input(tmp_path / "empty")
    assert not dicom.is_dicom_input(tmp_path / "nii")
    assert not dicom.is_dicom_input(tmp_path / "nii" / "ct.nii.gz")


def test_several_series_are_listed_and_chosen_by_uid(tmp_path):
    hu = phantom()
    first, second = ct_series(hu, description="arterial"), ct_series(hu + 5, description="venous")
    folder = tmp_path / "study"
    write_series(folder / "a", first)
    write_series(folder / "b", second)
    (folder / "README.txt").write_text("not DICOM")
    listed = dicom.list_series(folder)
    assert sorted((s.uid, s.description, len(s.files)) for s in listed) == sorted(
        [(first[0].SeriesInstanceUID, "arterial", 5), (second[0].SeriesInstanceUID, "venous", 5)])
    with pytest.raises(DataError, match="--series UID") as e:
        dicom.read_dicom_series(folder)
    assert first[0].SeriesInstanceUID in str(e.value) and "venous" in str(e.value)
    chosen = dicom.read_dicom_series(folder, second[0].SeriesInstanceUID)
    np.testing.assert_array_equal(chosen.pixels, hu + 5)
    with pytest.raises(DataError, match="no series with SeriesInstanceUID 1.2.3"):
        dicom.read_dicom_series(folder, "1.2.3")


@pytest.mark.parametrize("problem, match", [
    ("drift", "off the slice normal"),
    ("tilt_tag", "gantry tilt of 12"),
    ("skewed", "not two orthogonal unit vectors"),
    ("missing", "not uniform"),
    ("duplicate", "same slice position"),
])
def test_tilted_skewed_or_gappy_series_are_refused_naming_the_problem(tmp_path, problem, match):
    hu = phantom()
    datasets = ct_series(hu, drift=(0.3, 0.0, 0.0) if problem == "drift" else (0.0, 0.0, 0.0),
                         orientation=(1.0, 0.0, 0.0, 0.3, 0.95, 0.0) if problem == "skewed" else FLIPPED)
    if problem == "tilt_tag":
        datasets[2].GantryDetectorTilt = 12
    if problem == "missing":
        del datasets[2]
    if problem == "duplicate":
        datasets[3].ImagePositionPatient = datasets[2].ImagePositionPatient
    folder = write_series(tmp_path / "s", datasets)
    with pytest.raises(DataError, match=match):
        dicom.read_dicom_series(folder)


def test_a_folder_without_dicom_images_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no DICOM image series found"):
        dicom.list_series(tmp_path / "x")


# ------------------------------------------------------------------- the real 3D-IRCADb patient 1.17


@pytest.mark.real_data
def test_real_ircad_zip_read_for_predict_equals_the_importers_nifti(shared_data, tmp_path):
    src = shared_data / "3Dircadb1" / "3Dircadb1.17"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    # A patient holding the real image zip and only the real liver mask: the importer's image path
    # is the whole of its work, without reading the other organs' masks.
    patient = tmp_path / "3Dircadb1.17"
    patient.mkdir()
    (patient / "PATIENT_DICOM.zip").symlink_to((src / "PATIENT_DICOM.zip").resolve())
    with zipfile.ZipFile(src / "MASKS_DICOM.zip") as zf:
        liver = [n for n in zf.namelist() if n.startswith("MASKS_DICOM/liver/") and not n.endswith("/")]
        zf.extractall(patient, liver)
    report = ircadb.import_patient(patient, tmp_path / "lits", 17)
    imported, imported_geometry = nifti.read_image(report.image_path)

    image, geometry = dicom.image_and_geometry(dicom.read_dicom_series(src / "PATIENT_DICOM.zip"))
    assert image.shape == imported.shape == (119, 512, 512)
    np.testing.assert_array_equal(image, imported)
    np.testing.assert_allclose(geometry.affine, imported_geometry.affine, rtol=0, atol=1e-6)
    np.testing.assert_allclose(geometry.spacing, imported_geometry.spacing, rtol=0, atol=1e-6)


# ------------------------------------------------------- one read of the pixels, one float32 volume


def reference_image(folder):
    """Returns the internal volume the way the reader made it before reading each file once: every
    file read whole, slices sorted along the normal, rescaled in float64, stacked, then reoriented."""
    datasets = [pydicom.dcmread(p, force=True) for p in sorted(folder.iterdir())]
    o = np.asarray(datasets[0].ImageOrientationPatient, np.float64)
    normal = np.cross(o[:3], o[3:])
    datasets.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, np.float64) @ normal))
    pixels = np.stack([(ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
                       .astype(np.float32) for ds in datasets])
    series = dicom.Series(pixels=pixels, positions=np.stack([np.asarray(ds.ImagePositionPatient, np.float64)
                                                             for ds in datasets]),
                          orientation=o, pixel_spacing=np.asarray(datasets[0].PixelSpacing, np.float64), where="ref")
    img = dicom.nifti_image(series.nifti_array(), series.affine())
    geometry = nifti.geometry_of(img, "ref")
    return nifti.to_internal(np.asarray(img.dataobj, np.float32), geometry), geometry


@pytest.mark.filterwarnings("ignore::livseg_jax.data.nifti.HUWarning")
@pytest.mark.parametrize("orientation, slope, intercept", [
    (FLIPPED, 1, -1024.0),  # integer rescale: exact float32 arithmetic
    ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 1, 0.0),  # the usual axial orientation, no rescale
    ((0.0, 0.0, -1.0, 1.0, 0.0, 0.0), 2.5, -1000.3),  # sagittal slices, fractional rescale (float64 path)
    ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), 1000, 7.0),  # coronal slices, integers beyond float32's 2**24
])
def test_image_equals_the_read_whole_stack_and_reorient_reference_without_a_copy(
        tmp_path, orientation, slope, intercept):
    stored = np.random.default_rng(0).integers(-2000, 30000, (6, 5, 7)).astype(np.int16)
    datasets = ct_series(stored, orientation=orientation, spacing=(0.7, 0.9), intercept=0.0)  # pixels = stored
    for ds in datasets:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    folder = write_series(tmp_path / "s", datasets, order=[3, 0, 5, 4, 1, 2])
    series = dicom.read_dicom_series(folder)
    image, geometry = dicom.image_and_geometry(series)
    expected, expected_geometry = reference_image(folder)
    assert image.dtype == np.float32 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(geometry.affine, expected_geometry.affine)
    assert geometry.disk_shape == expected_geometry.disk_shape
    assert np.shares_memory(image, series.pixels)  # the volume was built once, in internal order
    assert series.without_pixels().pixels is None and series.without_pixels().shape == series.shape == (6, 5, 7)


def counting(files, log):
    """Returns `files` with openers whose streams add the bytes read to log[name]."""

    class Counted(io.BufferedReader):
        def __init__(self, raw, name):
            super().__init__(raw)
            self.counted_name = name

        def read(self, size=-1):
            data = super().read(size)
            log[self.counted_name] = log.get(self.counted_name, 0) + len(data)
            return data

        def read1(self, size=-1):
            data = super().read1(size)
            log[self.counted_name] = log.get(self.counted_name, 0) + len(data)
            return data

        def readinto(self, b):
            n = super().readinto(b)
            log[self.counted_name] = log.get(self.counted_name, 0) + n
            return n

    return [(name, lambda name=name, o=open_file: Counted(o(), name)) for name, open_file in files]


def test_listing_reads_headers_only_and_the_pixels_are_read_once(tmp_path, monkeypatch):
    hu = np.zeros((4, 64, 64), np.int16)
    folder = write_series(tmp_path / "s", ct_series(hu))
    archive = zip_folder(folder, tmp_path / "s.zip")
    size = (folder / "image_0").stat().st_size  # about 8 kB of pixels, 1 kB of header
    listed, read = {}, {}
    real_input_files = dicom.input_files
    monkeypatch.setattr(dicom, "input_files", lambda path: counting(real_input_files(path), listed))
    (series,) = dicom.list_series(archive)
    assert len(listed) == 4 and all(n < size / 2 for n in listed.values()), (listed, size)
    dicom.read_series(counting(series.files, read), "s")
    # one header read and one whole read per file: the pixel data once
    assert len(read) == 4 and all(size <= n < size * 1.5 for n in read.values()), (read, size)


def test_a_slope_beyond_float32_is_refused_naming_the_slice(tmp_path):
    datasets = ct_series(phantom())
    datasets[2].RescaleSlope = 1e39
    folder = write_series(tmp_path / "s", datasets)
    with pytest.raises(DataError, match="image_.: .*non-finite voxels"):
        dicom.read_dicom_series(folder)


def test_zip_members_opened_from_many_threads_read_back_exactly(tmp_path):
    # Python >= 3.12's ZipFile.open races on the archive's shared file position (see dicom.py);
    # slices are read on a thread pool, so every member must still read back byte for byte.
    rng = np.random.default_rng(0)
    archive = tmp_path / "series.zip"
    payloads = {f"DICOM/image_{i}": rng.integers(0, 4, 20_000, dtype=np.uint8).tobytes() for i in range(300)}
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in payloads.items():
            zf.writestr(name, data)
    files = dicom.input_files(archive)

    def read(slice_file):
        name, opener = slice_file
        with opener() as f:
            return name.split(":", 1)[1], f.read()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            got = dict(pool.map(read, files))
            assert got == payloads
