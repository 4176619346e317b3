"""The streaming gzip writer and the NIfTI writes through it equal nibabel's own serialisation."""

import gzip
import io
import zlib

import nibabel as nib
import numpy as np
import pytest

from livseg_jax.data import nifti
from livseg_jax.data.gzip_writer import GzipStream


@pytest.mark.parametrize("threads,block_bytes", [(1, 1 << 20), (3, 1000), (4, 7)])
def test_gzip_stream_is_one_member_that_inflates_to_the_bytes_written(threads, block_bytes):
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 3, n, dtype=np.uint8).tobytes() for n in (0, 5, 348, 4000, 70000, 1, 9999)]
    out = io.BytesIO()
    stream = GzipStream(out, 1, threads=threads, block_bytes=block_bytes)
    for piece in pieces:
        assert stream.write(piece) == len(piece)
    assert stream.tell() == sum(map(len, pieces))
    stream.finish()
    data = out.getvalue()
    expected = b"".join(pieces)
    assert gzip.decompress(data) == expected
    member = zlib.decompressobj(31)  # one member: nothing left over after its end
    assert member.decompress(data) == expected and member.eof and member.unused_data == b""


def test_gzip_stream_refuses_to_seek_anywhere_but_where_it_is():
    stream = GzipStream(io.BytesIO(), 1, threads=1)
    stream.write(b"abc")
    assert stream.seek(3) == 3
    with pytest.raises(OSError):
        stream.seek(0)


def _flipped_geometry(tmp_path, shape_xyz, affine, header_class=nib.Nifti1Image, extension=False):
    img = header_class(np.zeros(shape_xyz, np.int16), affine)
    if extension:
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"written by a scanner"))
    path = tmp_path / "v.nii.gz"
    nib.save(img, path)
    return nifti.geometry_of(nib.load(path), path)


@pytest.mark.parametrize("case", ["flipped", "permuted", "trailing_axis", "nifti2", "extension"])
def test_label_map_file_inflates_to_nibabels_bytes(tmp_path, case, monkeypatch):
    monkeypatch.setenv("LIVSEG_THREADS", "3")
    monkeypatch.setattr("livseg_jax.data.gzip_writer.BLOCK_BYTES", 512)  # many blocks on 3 threads
    shape, affine, klass = (13, 11, 7), np.diag([-0.8, -0.7, 2.5, 1.0]), nib.Nifti1Image
    if case == "permuted":
        affine = np.array([[0, 0, 2.0, 0], [0, -0.7, 0, 0], [0.7, 0, 0, 0], [0, 0, 0, 1]])
    if case == "trailing_axis":
        shape = (13, 11, 7, 1)
    if case == "nifti2":
        klass = nib.Nifti2Image
    geometry = _flipped_geometry(tmp_path, shape, affine, klass, extension=case == "extension")
    labels = np.random.default_rng(1).integers(0, 3, geometry.shape_dhw).astype(np.uint8)
    out = nifti.write_label_map(labels, geometry, tmp_path / "pred.nii.gz")
    # The reference: nibabel's serialisation of the Fortran-ordered copy, as written before.
    header = geometry.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)
    reference = type(nib.load(out))(nifti.from_internal(labels, geometry), geometry.affine, header=header)
    with gzip.open(out) as f:
        assert f.read() == reference.to_bytes()
    again, _ = nifti.read_label(out, expected=geometry)
    np.testing.assert_array_equal(again, labels)
