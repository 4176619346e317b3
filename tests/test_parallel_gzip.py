"""rapidgzip's parallel inflate (`livseg_jax.data.parallel_gzip`): ISA-L's bytes, or ISA-L itself."""

import gzip
import io

import nibabel as nib
import numpy as np
import pytest

from livseg_jax.data import nifti, parallel_gzip
from livseg_jax.data.nifti import DataError

rapidgzip = pytest.importorskip("rapidgzip")


@pytest.fixture
def fast_path(monkeypatch):
    """The fast path on every file, on 2 threads (the 2-core CI would otherwise never take it)."""
    monkeypatch.setattr(parallel_gzip, "MIN_THREADS", 1)
    monkeypatch.setattr(parallel_gzip, "MIN_BYTES", 0)
    monkeypatch.setenv("LIVSEG_THREADS", "2")
    opened = []
    real_open = rapidgzip.RapidgzipFile
    monkeypatch.setattr(rapidgzip, "RapidgzipFile", lambda *a, **k: opened.append(k) or real_open(*a, **k))
    return opened


def ct(tmp_path, name, writer):
    """Writes a small noisy int16 CT (about 1.3 MB inflated) with nibabel (zlib) or save_nifti (ISA-L)."""
    data = np.random.default_rng(0).normal(0, 300, (96, 96, 70)).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([-0.8, -0.8, 2.0, 1.0]))
    path = tmp_path / name
    if writer == "nibabel":
        nib.save(img, path)
    else:
        nifti.save_nifti(img, path)
    return path


@pytest.mark.parametrize("writer", ["nibabel", "isal"])
def test_inflated_bytes_and_the_read_volume_equal_isals(tmp_path, fast_path, writer, monkeypatch):
    path = ct(tmp_path, "ct.nii.gz", writer)
    raw = parallel_gzip.inflate(path)
    assert raw == gzip.decompress(path.read_bytes()) and raw.readonly  # the volume's views must stay read-only
    image, geometry = nifti.read_image(path)
    native, _ = nifti.read_image_native(path)
    assert not native.flags.writeable
    assert fast_path and all(k.get("parallelization") == 2 for k in fast_path)  # rapidgzip did read it
    monkeypatch.setattr(parallel_gzip, "MIN_THREADS", 99)  # the ISA-L reference
    reference, reference_geometry = nifti.read_image(path)
    np.testing.assert_array_equal(image, reference)
    np.testing.assert_array_equal(native, nifti.read_image_native(path)[0])
    np.testing.assert_array_equal(geometry.affine, reference_geometry.affine)


@pytest.mark.parametrize("dtype", ["float32", "scaled_int16"])
def test_volumes_nibabel_reads_from_the_inflated_buffer_equal_isals(tmp_path, fast_path, dtype, monkeypatch):
    # Float or scaled voxels are read by nibabel from a stream over the buffer (BufferStream), not a view.
    data = np.random.default_rng(1).normal(0, 300, (96, 96, 70))
    img = nib.Nifti1Image(data.astype(np.float32 if dtype == "float32" else np.int16), np.diag([0.8, 0.8, 2, 1]))
    if dtype == "scaled_int16":
        img.header.set_slope_inter(0.5, -1000)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    image, _ = nifti.read_image(path)
    assert fast_path
    monkeypatch.setattr(parallel_gzip, "MIN_THREADS", 99)
    np.testing.assert_array_equal(image, nifti.read_image(path)[0])


def test_a_trailer_length_other_than_the_streams_is_left_to_isal(tmp_path, fast_path):
    # The buffer is sized by the trailer's ISIZE: a stream longer (the rest is read on) or shorter
    # than it is not returned, whatever rapidgzip does about the mismatch.
    good = ct(tmp_path, "ct.nii.gz", "nibabel").read_bytes()
    length = int.from_bytes(good[-4:], "little")
    for name, isize in (("short.nii.gz", length - 1000), ("long.nii.gz", length + 1000), ("huge.nii.gz", 2**32 - 1)):
        bad = tmp_path / name
        bad.write_bytes(good[:-4] + isize.to_bytes(4, "little"))
        assert parallel_gzip.inflate(bad) is None, name


def test_buffer_stream_reads_and_seeks_as_bytes_io():
    data = bytes(range(256)) * 40
    ours, reference = parallel_gzip.BufferStream(memoryview(data)), io.BytesIO(data)
    for stream in (ours, reference):
        stream.seek(100)
    assert ours.read(10) == reference.read(10) and ours.tell() == reference.tell() == 110
    assert ours.seek(-5, io.SEEK_CUR) == reference.seek(-5, io.SEEK_CUR)
    assert ours.read() == reference.read()
    assert ours.seek(5, io.SEEK_END) == reference.seek(5, io.SEEK_END) and ours.read(4) == reference.read(4) == b""
    buffer = bytearray(7)
    ours.seek(3)
    assert ours.readinto(buffer) == 7 and bytes(buffer) == data[3:10]
    with pytest.raises(ValueError):
        ours.seek(-1)


def test_damaged_files_are_left_to_isal_and_reported_as_without_it(tmp_path, fast_path, monkeypatch):
    path = ct(tmp_path, "ct.nii.gz", "nibabel")
    good = path.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good[: len(good) * 2 // 3])  # rapidgzip returns the first part without an error
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(good[:-8] + bytes(b ^ 0xFF for b in good[-8:-4]) + good[-4:])  # CRC32 wrong
    members = tmp_path / "members.nii.gz"
    members.write_bytes(gzip.compress(gzip.decompress(good)[:1000]) + gzip.compress(gzip.decompress(good)[1000:]))
    assert parallel_gzip.inflate(truncated) is None and parallel_gzip.inflate(corrupt) is None
    assert parallel_gzip.inflate(members) is None  # the trailer holds the last member's length: ISA-L reads it
    errors = {}
    for fast in (True, False):
        monkeypatch.setattr(parallel_gzip, "MIN_THREADS", 1 if fast else 99)
        for bad in (truncated, corrupt):
            with pytest.raises(DataError) as e:
                nifti.read_image(bad)
            errors.setdefault(bad.name, set()).add(str(e.value))
    assert all(len(messages) == 1 for messages in errors.values()), errors  # the same message either way
    assert "truncated" in errors["truncated.nii.gz"].pop()


def test_few_cores_or_a_small_file_keep_isal(tmp_path, monkeypatch):
    path = ct(tmp_path, "ct.nii.gz", "isal")
    monkeypatch.setattr(rapidgzip, "RapidgzipFile", lambda *a, **k: pytest.fail("rapidgzip used"))
    monkeypatch.setattr(parallel_gzip, "MIN_BYTES", 0)
    assert parallel_gzip.inflate(path, threads=parallel_gzip.MIN_THREADS - 1) is None
    monkeypatch.setattr(parallel_gzip, "MIN_BYTES", path.stat().st_size + 1)
    assert parallel_gzip.inflate(path, threads=parallel_gzip.MIN_THREADS) is None
