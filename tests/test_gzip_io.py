"""Parallel gzip for .nii.gz: byte-exact round trips, compatibility with gzip/nibabel, clear errors."""

import gzip
import io
import os
import pathlib
import pickle
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest

from livseg_jax.data import gzip_io, nifti
from livseg_jax.data.gzip_io import GzipDataError
from livseg_jax.data.nifti import DataError

CHUNK = 1000  # small chunks so that small inputs span several members


def _data(n, seed=0):
    """Returns `n` compressible bytes (runs of a few values, like a label map with noise)."""
    rng = np.random.default_rng(seed)
    return np.repeat(rng.integers(0, 5, n // 7 + 1, dtype=np.uint8), 7)[:n].tobytes()


def _members(stream):
    """Returns the number of gzip members in `stream` (inflating it with plain zlib)."""
    count, rest = 0, stream
    while rest:
        d = zlib.decompressobj(31)
        d.decompress(rest)
        assert d.eof
        rest, count = d.unused_data, count + 1
    return count


@pytest.mark.parametrize("n", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 20_000])
def test_round_trip_is_byte_exact_across_chunk_boundaries(n):
    data = _data(n, seed=n)
    stream = gzip_io.compress(data, chunk_size=CHUNK, threads=4)
    assert _members(stream) == max(1, -(-n // CHUNK))
    assert gzip.decompress(stream) == data  # Python's gzip reads the multi-member stream
    for threads in (1, 4):
        assert gzip_io.decompress(stream, threads=threads) == data


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_threaded_compression_gives_the_same_bytes_as_one_thread(level):
    data = _data(25_000)
    one = gzip_io.compress(data, level=level, chunk_size=CHUNK, threads=1)
    many = gzip_io.compress(data, level=level, chunk_size=CHUNK, threads=4)
    assert one == many
    sizes = gzip_io.member_sizes(one)
    assert len(sizes) == 25 and sum(sizes) == len(one)


def test_empty_input_is_one_valid_empty_member():
    stream = gzip_io.compress(b"")
    assert gzip.decompress(stream) == b"" and gzip_io.decompress(stream) == b""
    assert gzip_io.member_sizes(stream) == [len(stream)]
    assert gzip_io.decompress(b"") == b""  # like gzip.decompress(b"")


def test_numpy_arrays_and_memoryviews_are_compressed_as_their_bytes():
    arr = np.arange(3000, dtype=np.int16).reshape(30, 100)
    assert gzip_io.decompress(gzip_io.compress(arr, chunk_size=CHUNK)) == arr.tobytes()
    assert gzip_io.decompress(gzip_io.compress(memoryview(arr), chunk_size=CHUNK)) == arr.tobytes()
    with pytest.raises(ValueError, match="contiguous"):
        gzip_io.compress(arr[:, ::2])


def test_foreign_streams_are_read_sequentially():
    a, b = _data(5000, 1), _data(3000, 2)
    assert gzip_io.decompress(gzip.compress(a), threads=4) == a  # one member, as nibabel writes
    assert gzip_io.decompress(gzip.compress(a) + gzip.compress(b), threads=4) == a + b
    ours = gzip_io.compress(a, chunk_size=CHUNK)
    assert gzip_io.decompress(ours + gzip.compress(b), threads=4) == a + b  # mixed members
    # Optional header fields (file name, mtime) as gzip.GzipFile writes them.
    buf = io.BytesIO()
    with gzip.GzipFile(filename="volume.nii", mode="wb", fileobj=buf, mtime=12345) as f:
        f.write(b)
    assert buf.getvalue()[3] & 0x08  # FNAME set
    assert gzip_io.decompress(buf.getvalue() + gzip.compress(a), threads=4) == b + a
    # Bytes after the last member that do not start a member are ignored, as gunzip does.
    assert gzip_io.decompress(ours + b"\x00" * 16, threads=4) == a


def test_parts_reader_reads_and_seeks_like_bytesio():
    data = _data(10_000, 5)
    parts = [data[:0], data[:3], data[3:3000], data[3000:3001], data[3001:]]
    ours, ref = gzip_io.PartsReader(parts), io.BytesIO(data)
    rng = np.random.default_rng(0)
    for _ in range(200):
        pos, n = int(rng.integers(0, 10_100)), int(rng.integers(0, 4000))
        whence = int(rng.integers(0, 3))
        offset = {0: pos, 1: pos - ref.tell(), 2: pos - len(data)}[whence]
        assert ours.seek(offset, whence) == ref.seek(offset, whence)
        buf_a, buf_b = bytearray(n), bytearray(n)
        assert ours.readinto(buf_a) == ref.readinto(buf_b) and buf_a == buf_b
        assert ours.tell() == ref.tell()
    ours.seek(0)
    assert ours.read() == data and ours.read(5) == b""


def test_decompressed_parts_join_to_the_data():
    data = _data(30_000)
    stream = gzip_io.compress(data, chunk_size=CHUNK)
    for threads in (1, 4):
        parts = gzip_io.decompress_parts(stream, threads=threads)
        assert b"".join(parts) == data and all(len(p) <= max(CHUNK, 4 << 20) for p in parts)


def test_written_file_is_read_by_gzip_gunzip_module_and_nibabel(tmp_path):
    data = np.zeros((20, 30, 12), np.uint8)
    data[5:15, 8:22, 3:9] = 1
    data[8:10, 10:12, 4:6] = 2
    img = nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.0, 1.0]))
    raw = img.to_bytes()
    path = gzip_io.write_file(tmp_path / "lab.nii.gz", raw, chunk_size=CHUNK, threads=3)
    assert len(gzip_io.member_sizes(path.read_bytes())) == -(-len(raw) // CHUNK)
    with gzip.open(path, "rb") as f:
        assert f.read() == raw
    back = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    np.testing.assert_array_equal(back.affine, nib.Nifti1Image.from_bytes(raw).affine)


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


def test_label_map_write_read_round_trip_through_the_fast_path(tmp_path):
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


def test_failed_fast_write_leaves_no_file_behind(tmp_path, monkeypatch):
    case = nifti.read_case(nifti.save_nifti(_nibabel_images()["int16_scaled"], tmp_path / "v.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "pred.nii.gz").write_bytes(b"old")

    def broken_write(path, data, **kwargs):
        pathlib.Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(gzip_io, "write_file", broken_write)
    with pytest.raises(OSError, match="disk full"):
        nifti.write_label_map(np.zeros(case.geometry.shape_dhw, np.uint8), case.geometry, out / "pred.nii.gz")
    assert sorted(os.listdir(out)) == ["pred.nii.gz"]
    assert (out / "pred.nii.gz").read_bytes() == b"old"


# ---------------------------------------------------------------- damaged streams: errors name the file


def _written(tmp_path, n=12_000):
    data = _data(n)
    return gzip_io.write_file(tmp_path / "vol.nii.gz", data, chunk_size=CHUNK), data


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.999])
def test_truncated_stream_raises_naming_the_file(tmp_path, threads, keep):
    path, _ = _written(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(GzipDataError, match=r"vol\.nii\.gz: gzip data is truncated") as info:
        gzip_io.read_file(path, threads=threads)
    assert info.value.truncated


@pytest.mark.parametrize("threads", [1, 4])
def test_corrupt_stream_raises_naming_the_file(tmp_path, threads):
    path, _ = _written(tmp_path)
    raw = bytearray(path.read_bytes())
    sizes = gzip_io.member_sizes(bytes(raw))
    raw[sum(sizes[:3]) + 40] ^= 0xFF  # inside the deflate data of member 3
    path.write_bytes(bytes(raw))
    with pytest.raises(GzipDataError, match=r"vol\.nii\.gz: corrupt gzip data in member 3"):
        gzip_io.read_file(path, threads=threads)


@pytest.mark.parametrize("threads", [1, 4])
def test_crc_mismatch_is_detected(tmp_path, threads):
    path, _ = _written(tmp_path)
    raw = bytearray(path.read_bytes())
    sizes = gzip_io.member_sizes(bytes(raw))
    raw[sizes[0] - 8] ^= 0x01  # CRC-32 in the trailer of member 0
    path.write_bytes(bytes(raw))
    with pytest.raises(GzipDataError, match=r"vol\.nii\.gz: corrupt gzip data in member 0.*incorrect data check"):
        gzip_io.read_file(path, threads=threads)


def test_wrong_recorded_member_lengths_never_give_wrong_data(tmp_path):
    path, data = _written(tmp_path)
    raw = path.read_bytes()
    sizes = gzip_io.member_sizes(raw)
    # The length field sits after magic(2) CM FLG MTIME(4) XFL OS XLEN(2) SI1 SI2 LEN(2).
    for wrong in (sizes[0] - 5, sizes[0] + 5, sizes[0] + sizes[1], 10**9):
        tampered = bytearray(raw)
        struct.pack_into("<Q", tampered, 16, wrong)
        assert gzip_io.decompress(bytes(tampered), threads=4) == data  # zlib's own framing decides
    tampered = bytearray(raw)
    struct.pack_into("<Q", tampered, 16, sizes[0] + sizes[1])
    tampered[sizes[0] + 30] ^= 0xFF  # and damaged data inside member 1
    with pytest.raises(GzipDataError, match=r"x\.gz: corrupt gzip data in member 1"):
        gzip_io.decompress(bytes(tampered), threads=4, name="x.gz")


def test_not_gzip_raises_naming_the_file(tmp_path):
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(b"\x5c\x01\x00\x00" + b"\x00" * 400)
    with pytest.raises(GzipDataError, match=r"plain\.nii\.gz: not a gzip file"):
        gzip_io.read_file(path)


def test_error_survives_pickling():
    e = pickle.loads(pickle.dumps(GzipDataError("a.nii.gz", "bad", truncated=True, n_decompressed=7)))
    assert str(e) == "a.nii.gz: bad" and e.truncated and e.n_decompressed == 7 and isinstance(e, OSError)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", r"seg\.nii\.gz: cannot read voxel data \(truncated or corrupt file\?\): gzip data is truncated"),
        ("flip", r"seg\.nii\.gz: cannot read voxel data \(truncated or corrupt file\?\): corrupt gzip data"),
        ("header", r"seg\.nii\.gz: cannot read as NIfTI \(corrupt or not an image file\)"),
    ],
)
def test_damaged_nifti_gz_written_here_gives_data_error_naming_the_file(tmp_path, damage, message):
    img = nib.Nifti1Image(np.random.default_rng(0).integers(-1000, 1000, (40, 40, 30)).astype(np.int16), np.eye(4))
    path = tmp_path / "seg.nii.gz"
    gzip_io.write_file(path, img.to_bytes(), chunk_size=16_000)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[:30]
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=message):
        nifti.read_case(path)
