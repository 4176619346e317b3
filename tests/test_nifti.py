"""NIfTI reading/writing: internal orientation, exact write-back, and one clear error per bad input."""

import gzip
import json
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest

from livseg_jax.data import nifti
from livseg_jax.data.nifti import DataError, Geometry, HUWarning


def _ct(shape, seed=0):
    """Returns a CT-like int16 volume: air, soft tissue and a little bone."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, np.int16)
    sl = tuple(slice(s // 4, s - s // 4) for s in shape)
    vol[sl] = rng.integers(-100, 300, size=vol[sl].shape)
    return vol


def _save(path, data, affine=None, dtype=None):
    affine = np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, path)
    return pathlib.Path(path)


def _labels(shape):
    lab = np.zeros(shape, np.uint8)
    lab[1:-1, 2:-2, 1:-1] = 1
    lab[2:4, 3:5, 2:3] = 2
    return lab


# Permutations and flips of the voxel axes, plus an oblique affine: all must be read without
# resampling and written back bit-exactly.
AFFINES = {
    "ras": np.diag([0.8, 0.9, 2.5, 1.0]),
    "lps": np.array([[-0.7, 0, 0, 120], [0, -0.7, 0, 90], [0, 0, 1.6, -40], [0, 0, 0, 1.0]]),
    "psl": np.array([[0, 0, -2.5, 10], [-0.7, 0, 0, 20], [0, 0.8, 0, -5], [0, 0, 0, 1.0]]),
    "oblique": np.array([[0.7, 0.1, 0, 3], [-0.1, 0.7, 0.2, 1], [0, -0.05, 2.0, 7], [0, 0, 0, 1.0]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_internal_array_is_ras_reordered_to_dhw_without_resampling(tmp_path, name):
    affine = AFFINES[name]
    shape = (5, 6, 7)
    ids = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 1000
    path = _save(tmp_path / "volume-1.nii.gz", ids, affine)
    case = nifti.read_case(path)
    g = case.geometry
    # Axes of the internal affine point to +z, +y, +x (closest canonical directions).
    a = g.affine_dhw[:3, :3]
    assert [int(np.argmax(np.abs(a[:, j]))) for j in range(3)] == [2, 1, 0]
    assert np.all(np.diag(a[::-1]) > 0)
    assert sorted(case.image.shape) == sorted(shape)
    assert case.image.shape == g.shape_dhw
    # Every internal voxel sits at the same world position as the disk voxel holding its value.
    rng = np.random.default_rng(0)
    for _ in range(20):
        dhw = tuple(int(rng.integers(s)) for s in case.image.shape)
        disk_idx = np.unravel_index(int(case.image[dhw] + 1000), shape)
        world_disk = affine @ np.array([*disk_idx, 1.0])
        world_int = g.affine_dhw @ np.array([*dhw, 1.0])
        np.testing.assert_allclose(world_int, world_disk, atol=1e-9)
    np.testing.assert_allclose(case.spacing, nib.affines.voxel_sizes(g.affine_dhw))


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_write_label_map_restores_exact_grid_affine_and_header(tmp_path, name):
    affine = AFFINES[name]
    shape = (6, 8, 5)
    img = nib.Nifti1Image(_ct(shape), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, tmp_path / "volume-3.nii.gz")
    lab_disk = _labels(shape)
    _save(tmp_path / "segmentation-3.nii.gz", lab_disk, affine, np.uint8)
    case = nifti.read_case(tmp_path / "volume-3.nii.gz", tmp_path / "segmentation-3.nii.gz")
    out = nifti.write_label_map(case.label, case.geometry, tmp_path / "out" / "pred.nii.gz")
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), lab_disk)
    np.testing.assert_array_equal(back.affine, nib.load(tmp_path / "volume-3.nii.gz").affine)
    for key in ("qform_code", "sform_code", "pixdim", "xyzt_units", "srow_x", "quatern_b"):
        np.testing.assert_array_equal(back.header[key], img.header[key])
    assert sorted(os.listdir(tmp_path / "out")) == ["pred.nii.gz"]


def test_spacing_is_in_internal_slice_row_column_order(tmp_path):
    path = _save(tmp_path / "v.nii.gz", _ct((8, 9, 4)), np.diag([0.7, 0.9, 3.0, 1]))
    case = nifti.read_case(path)
    assert case.image.shape == (4, 9, 8)
    np.testing.assert_allclose(case.spacing, [3.0, 0.9, 0.7])
    assert case.image.dtype == np.float32 and case.case_id == "v"


def test_trailing_singleton_axis_is_accepted_and_written_back(tmp_path):
    vol = _ct((6, 5, 4))[..., None]
    path = _save(tmp_path / "v.nii", vol)
    case = nifti.read_case(path)
    assert case.image.shape == (4, 5, 6)
    out = nifti.write_label_map((case.image > 0).astype(np.uint8), case.geometry, tmp_path / "o.nii")
    back = np.asarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(back, (vol > 0).astype(np.uint8))


def test_scaled_int16_is_read_in_hu(tmp_path):
    stored = np.full((6, 6, 4), 0, np.int16)
    stored[2:4, 2:4, :] = 1064  # stored 1064 * 1 - 1024 = 40 HU
    img = nib.Nifti1Image(stored, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "v.nii.gz")
    image, _ = nifti.read_image(tmp_path / "v.nii.gz")
    assert image.min() == -1024 and image.max() == 40


def test_geometry_survives_json(tmp_path):
    path = _save(tmp_path / "v.nii.gz", _ct((5, 6, 7)), AFFINES["psl"])
    g = nifti.read_case(path).geometry
    g2 = Geometry.from_dict(json.loads(json.dumps(g.to_dict())))
    np.testing.assert_array_equal(g2.affine, g.affine)
    np.testing.assert_array_equal(g2.ornt, g.ornt)
    assert g2.disk_shape == g.disk_shape
    assert g2.header.binaryblock == g.header.binaryblock


# ---------------------------------------------------------------- bad inputs: one clear error each


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(DataError, match=r"nope\.nii\.gz: file does not exist"):
        nifti.read_case(tmp_path / "nope.nii.gz")


def test_unreadable_file_error_names_it(tmp_path, monkeypatch):
    path = _save(tmp_path / "v.nii.gz", _ct((4, 4, 4)))
    path.chmod(0)
    # Root can read a mode-000 file, so the permission check is simulated for it.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if p == path else real_access(p, m))
    with pytest.raises(DataError, match=r"v\.nii\.gz: file is not readable"):
        nifti.read_case(path)
    with pytest.raises(DataError, match=r"not a regular file"):
        nifti.read_case(tmp_path)


def test_corrupt_file_error_names_it(tmp_path):
    path = tmp_path / "volume-7.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(DataError, match=r"volume-7\.nii\.gz: cannot read as NIfTI"):
        nifti.read_case(path)


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_truncated_file_error_names_it(tmp_path, name):
    path = _save(tmp_path / name, _ct((32, 32, 16)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(DataError, match=rf"{name}: cannot read voxel data \(truncated"):
        nifti.read_case(path)


def test_4d_image_error_names_it(tmp_path):
    path = _save(tmp_path / "v.nii.gz", np.zeros((4, 4, 4, 2), np.int16))
    with pytest.raises(DataError, match=r"v\.nii\.gz: expected a 3D volume, got a 4D image"):
        nifti.read_case(path)


def test_label_shape_mismatch_error_names_label(tmp_path):
    img = _save(tmp_path / "v.nii.gz", _ct((6, 6, 4)))
    lab = _save(tmp_path / "s.nii.gz", np.zeros((6, 6, 5), np.uint8))
    with pytest.raises(DataError, match=r"s\.nii\.gz: label shape \(6, 6, 5\) does not match"):
        nifti.read_case(img, lab)


def test_label_affine_mismatch_error_names_label(tmp_path):
    img = _save(tmp_path / "v.nii.gz", _ct((6, 6, 4)))
    lab = _save(tmp_path / "s.nii.gz", np.zeros((6, 6, 4), np.uint8), np.diag([0.8, 0.8, 5.0, 1]))
    with pytest.raises(DataError, match=r"s\.nii\.gz: label affine does not match"):
        nifti.read_case(img, lab)


def test_label_values_outside_0_1_2_error_names_label(tmp_path):
    img = _save(tmp_path / "v.nii.gz", _ct((6, 6, 4)))
    bad = _labels((6, 6, 4))
    bad[0, 0, 0] = 255
    lab = _save(tmp_path / "s.nii.gz", bad, dtype=np.uint8)
    with pytest.raises(DataError, match=r"s\.nii\.gz: label values outside \{0, 1, 2\}: 255"):
        nifti.read_case(img, lab)


def test_non_integer_labels_are_rejected(tmp_path):
    img = _save(tmp_path / "v.nii.gz", _ct((6, 6, 4)))
    lab = _save(tmp_path / "s.nii.gz", np.full((6, 6, 4), 0.5, np.float32))
    with pytest.raises(DataError, match=r"s\.nii\.gz: label map holds non-integer"):
        nifti.read_case(img, lab)


@pytest.mark.parametrize("value,word", [(np.nan, "1 NaN"), (np.inf, "1 inf")])
def test_non_finite_voxels_error_names_file(tmp_path, value, word):
    vol = _ct((6, 6, 4)).astype(np.float32)
    vol[3, 3, 2] = value
    path = _save(tmp_path / "v.nii.gz", vol)
    with pytest.raises(DataError, match=rf"v\.nii\.gz: 1 non-finite voxels .*{word}"):
        nifti.read_case(path)


@pytest.mark.parametrize("scale", ["raw_unsigned", "normalised"])
def test_intensities_not_in_hu_give_a_warning_naming_the_file(tmp_path, scale):
    vol = _ct((16, 16, 8)).astype(np.float32)
    vol = vol + 1024 if scale == "raw_unsigned" else (vol + 1000) / 1300
    path = _save(tmp_path / "v.nii.gz", vol)
    with pytest.warns(HUWarning, match=r"v\.nii\.gz: intensities do not look like Hounsfield"):
        nifti.read_case(path)


def test_real_hu_volume_gives_no_warning(tmp_path, recwarn):
    nifti.read_case(_save(tmp_path / "v.nii.gz", _ct((16, 16, 8))))
    assert not [w for w in recwarn if issubclass(w.category, HUWarning)]


@pytest.mark.parametrize("name", ["pred.nii.gz", "pred.nii"])
def test_failed_write_leaves_no_file_behind(tmp_path, monkeypatch, name):
    case = nifti.read_case(_save(tmp_path / "v.nii.gz", _ct((6, 6, 4))))
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"old")

    def broken_write(img, path, *args, **kwargs):
        pathlib.Path(path).write_bytes(b"half")
        raise OSError("disk full")

    class BrokenGzip(nifti.GzipStream):  # the .nii.gz writer: half a file, then the disk is full
        def write(self, data):
            super().write(data)
            raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_write)  # .nii
    monkeypatch.setattr(nifti, "GzipStream", BrokenGzip)  # .nii.gz
    with pytest.raises(OSError, match="disk full"):
        nifti.write_label_map(np.zeros((4, 6, 6), np.uint8), case.geometry, out / name)
    assert sorted(os.listdir(out)) == [name]
    assert (out / name).read_bytes() == b"old"


def test_write_label_map_rejects_wrong_shape_and_writes_nothing(tmp_path):
    case = nifti.read_case(_save(tmp_path / "v.nii.gz", _ct((6, 6, 4))))
    with pytest.raises(ValueError, match="does not match the grid"):
        nifti.write_label_map(np.zeros((6, 6, 4), np.uint8), case.geometry, tmp_path / "o.nii.gz")
    assert not list(tmp_path.glob("*o.nii.gz*"))


# ------------------------------------------------------------ .nii.gz: read whole, members checked


def _nibabel_images():
    rng = np.random.default_rng(3)
    affine = np.array([[-0.7, 0, 0, 120], [0, -0.7, 0, 90], [0, 0, 1.6, -40], [0, 0, 0, 1.0]])
    hu = rng.integers(-1000, 1500, (24, 20, 9)).astype(np.int16)
    scaled = nib.Nifti1Image(hu, affine)
    scaled.header.set_slope_inter(0.5, -1024.0)
    scaled.header.set_qform(affine, code=1)
    scaled.header.set_sform(affine, code=2)
    scaled.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"written by nibabel"))
    labels = nib.Nifti1Image((hu > 200).astype(np.uint8), affine)
    floats = nib.Nifti2Image(hu.astype(np.float32) / 3, affine)
    return {"int16_scaled": scaled, "uint8": labels, "nifti2_float32": floats}


def _multi_member_gzip(data: bytes, chunk: int) -> bytes:
    """Returns `data` as a gzip file of one member per `chunk` bytes (as bgzip and pigz -i write)."""
    return b"".join(gzip.compress(data[i:i + chunk], 1) for i in range(0, len(data), chunk))


@pytest.mark.parametrize("name", ["int16_scaled", "uint8", "nifti2_float32"])
def test_nibabel_written_files_are_read_identically(tmp_path, name):
    img = _nibabel_images()[name]
    path = tmp_path / f"{name}.nii.gz"
    nib.save(img, path)
    ref = nib.load(path)
    ours = nifti.load_image(path)
    assert type(ours) is type(ref)
    assert ours.header.binaryblock == ref.header.binaryblock
    assert [e.get_content() for e in ours.header.extensions] == [e.get_content() for e in ref.header.extensions]
    np.testing.assert_array_equal(ours.affine, ref.affine)
    np.testing.assert_array_equal(ours.get_fdata(), ref.get_fdata())
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(ref.dataobj))
    # The same volume uncompressed goes through nibabel alone: the internal arrays agree.
    nib.save(img, tmp_path / "plain.nii")
    if name == "uint8":
        a, ga = nifti.read_label(path)
        b, gb = nifti.read_label(tmp_path / "plain.nii")
        assert a.dtype == np.uint8
    else:
        a, ga = nifti.read_image(path)
        b, gb = nifti.read_image(tmp_path / "plain.nii")
    np.testing.assert_array_equal(a, b)
    assert ga.header.binaryblock == gb.header.binaryblock


def test_multi_member_and_zero_padded_files_are_read_whole(tmp_path):
    img = _nibabel_images()["int16_scaled"]
    raw = img.to_bytes()
    expected = np.asanyarray(nib.Nifti1Image.from_bytes(raw).dataobj)
    path = tmp_path / "v.nii.gz"
    for stream in (_multi_member_gzip(raw, 1000), gzip.compress(raw) + b"\x00" * 16):
        path.write_bytes(stream)
        np.testing.assert_array_equal(np.asanyarray(nifti.load_image(path).dataobj), expected)


def test_label_map_write_read_round_trip(tmp_path):
    img = _nibabel_images()["int16_scaled"]
    nib.save(img, tmp_path / "v.nii.gz")
    case = nifti.read_case(tmp_path / "v.nii.gz")
    labels = (case.image > 0).astype(np.uint8) + (case.image > 500)
    out = nifti.write_label_map(labels, case.geometry, tmp_path / "pred.nii.gz")
    back = nib.load(out)  # nibabel's own loader
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(back.affine, nib.load(tmp_path / "v.nii.gz").affine)
    for key in ("qform_code", "sform_code", "pixdim", "srow_x", "quatern_b"):
        np.testing.assert_array_equal(back.header[key], img.header[key])
    again, _ = nifti.read_label(out, expected=case.geometry)
    np.testing.assert_array_equal(again, labels)
    with gzip.open(out) as f:  # and Python's gzip module
        assert f.read() == nib.load(out).to_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz", "v.nii.gz"]


def test_labels_are_read_in_their_stored_dtype_and_written_in_disk_order(tmp_path):
    img = _nibabel_images()["uint8"]
    nib.save(img, tmp_path / "s.nii.gz")
    loaded = nifti.load_image(tmp_path / "s.nii.gz")
    assert nifti.read_voxels(loaded, "s", None).dtype == np.uint8  # not float64 via get_fdata
    labels, geometry = nifti.read_label(tmp_path / "s.nii.gz")
    disk = nifti.from_internal(labels, geometry)
    assert disk.flags.f_contiguous  # NIfTI order: nibabel writes it without transposing
    np.testing.assert_array_equal(disk, np.asanyarray(img.dataobj))


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", r"seg\.nii\.gz: cannot read voxel data \(truncated or corrupt file\?\): gzip data is truncated"),
        ("flip", r"seg\.nii\.gz: cannot read voxel data \(truncated or corrupt file\?\): corrupt gzip data"),
        ("crc", r"seg\.nii\.gz: cannot read voxel data \(truncated or corrupt file\?\): corrupt gzip data"),
        ("header", r"seg\.nii\.gz: cannot read as NIfTI \(corrupt or not an image file\)"),
        ("not gzip", r"seg\.nii\.gz: cannot read as NIfTI \(corrupt or not an image file\): not a gzip file"),
    ],
)
def test_damaged_nifti_gz_gives_data_error_naming_the_file(tmp_path, damage, message):
    img = nib.Nifti1Image(np.random.default_rng(0).integers(-1000, 1000, (40, 40, 30)).astype(np.int16), np.eye(4))
    path = tmp_path / "seg.nii.gz"
    raw = bytearray(_multi_member_gzip(img.to_bytes(), 16_000))
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "crc":
        raw[-8] ^= 0x01  # CRC-32 of the last member: its data decodes, only reading to the end finds it
    elif damage == "header":
        raw = raw[:30]
    else:
        raw = bytearray(img.to_bytes())  # an uncompressed NIfTI named .nii.gz
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=message):
        nifti.read_case(path)
