"""rapidgzip's parallel inflate (`livseg_jax.data.parallel_gzip`): ISA-L's bytes, or ISA-L itself."""

import gzip

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
    real_open = rapidgzip.open
    monkeypatch.setattr(rapidgzip, "open", lambda *a, **k: opened.append(k) or real_open(*a, **k))
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
    assert raw == gzip.decompress(path.read_bytes())
    image, geometry = nifti.read_image(path)
    assert fast_path and all(k.get("parallelization") == 2 for k in fast_path)  # rapidgzip did read it
    monkeypatch.setattr(parallel_gzip, "MIN_THREADS", 99)  # the ISA-L reference
    reference, reference_geometry = nifti.read_image(path)
    np.testing.assert_array_equal(image, reference)
    np.testing.assert_array_equal(geometry.affine, reference_geometry.affine)


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
    monkeypatch.setattr(rapidgzip, "open", lambda *a, **k: pytest.fail("rapidgzip used"))
    monkeypatch.setattr(parallel_gzip, "MIN_BYTES", 0)
    assert parallel_gzip.inflate(path, threads=parallel_gzip.MIN_THREADS - 1) is None
    monkeypatch.setattr(parallel_gzip, "MIN_BYTES", path.stat().st_size + 1)
    assert parallel_gzip.inflate(path, threads=parallel_gzip.MIN_THREADS) is None
