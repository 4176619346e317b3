"""Reading and writing NIfTI CT volumes and label maps in the internal (D, H, W) orientation.

Internal orientation: a file's voxel axes are permuted and flipped (never resampled) to the closest
canonical RAS+ orientation, giving an array indexed (x, y, z) with x towards the patient's right,
y anterior and z superior; that array is transposed to (z, y, x) = (D, H, W): slice axis first, then
rows, then columns. Spacing in that order is (sz, sy, sx) in mm. `Geometry` records the file's
affine, header, shape and orientation, so a label map in internal order is written back on exactly
the input's grid (`write_label_map`).

Every problem with an input raises `DataError` (a `ValueError`) whose message starts with the
file's path; intensities that do not look like Hounsfield units raise a `HUWarning`. Header
anomalies that nibabel would repair without naming the file are checked on the raw header
(`header_anomalies`): a zero or non-finite pixdim the affine depends on is refused (nibabel would
read it as 1 mm); a negative pixdim, a qform that disagrees with the sform and a NaN/inf scale
factor raise an `InputWarning` naming the file and the repair (`predict` records them in the
timings JSON). Float64 voxels beyond float32's range are refused as such, not as non-finite.

A `.nii.gz` file is inflated completely when it is loaded, with ISA-L (python-isal's `igzip`:
every member's CRC and length are checked, so a damaged file is reported there, not half-read),
and nibabel parses the bytes; writing streams nibabel's serialisation (header, then the voxels
slice by slice) into a `gzip_writer.GzipStream`, which deflates blocks with ISA-L (level 1) on
all cores while the next arrive: one gzip member, no full-size bytes object. ISA-L reads a CT
written by another tool 1.8x faster than nibabel's zlib stream (`python -m
experiments.bench_nifti_io`, docs/benchmarks.md). With the optional rapidgzip installed and at
least 8 usable cores, a large file is inflated on all cores instead, its result verified
(`parallel_gzip`). Arrays are handed to nibabel as views in disk axis order (`disk_view`:
flips are strides), which nibabel writes slice by slice without a full copy. `read_image`
converts an unscaled integer CT straight from the inflated bytes to internal float32, the
reorientation and the cast in one pass over slabs of slices on all cores (`slabs.py`);
`read_image_native` (prediction) keeps an unscaled 8- or 16-bit CT in its own type as a view of
those bytes, with values equal to `read_image`'s.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import os
import pathlib
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib

from livseg_jax.atomic_write import atomic_path
from livseg_jax.data import parallel_gzip
from livseg_jax.data.cases import case_id_of
from livseg_jax.data.gzip_writer import GzipStream
from livseg_jax.data.slabs import parallel_slabs

PathLike = str | os.PathLike
LABEL_VALUES = (0, 1, 2)  # LiTS: background, liver, tumour
GZIP_LEVEL = 1  # ISA-L's fastest useful level; nibabel writes zlib level 1
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)
# Affines of image and label are "the same" within this tolerance (mm); files written by different
# tools round the affine to float32, so exact equality is too strict.
AFFINE_ATOL_MM = 1e-3
# qform and sform "agree" within this (mm): the qform's float32 quaternion cannot hold an oblique
# affine's shear or full precision (0.03 mm seen on a writer's oblique test volume).
QFORM_SFORM_ATOL_MM = 0.1


class DataError(ValueError):
    """A data file is missing, unreadable, corrupt or inconsistent; the message names the file."""


class HUWarning(UserWarning):
    """An image's intensities do not look like Hounsfield units."""


class InputWarning(UserWarning):
    """An input file has an anomaly that reading repairs; the message names the file and the repair."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Everything needed to write an internal (D, H, W) array back onto a file's exact grid."""

    affine: np.ndarray  # (4, 4) voxel -> world (RAS mm) of the file
    disk_shape: tuple[int, ...]  # shape on disk: 3 spatial axes, maybe trailing singleton axes
    ornt: np.ndarray  # (3, 2) nibabel orientation: file axis i -> RAS axis ornt[i, 0], flip ornt[i, 1]
    header: nib.Nifti1Header  # copy of the file's header (Nifti1Header or Nifti2Header)

    @property
    def shape_dhw(self) -> tuple[int, int, int]:
        """Returns the internal (D, H, W) shape of this grid."""
        ras = np.empty(3, dtype=np.int64)
        for i in range(3):
            ras[int(self.ornt[i, 0])] = self.disk_shape[i]
        return int(ras[2]), int(ras[1]), int(ras[0])

    @property
    def spacing(self) -> np.ndarray:
        """Returns the voxel spacing (sz, sy, sx) in mm in internal order, shape (3,)."""
        sizes = nib.affines.voxel_sizes(self.affine)
        ras = np.empty(3)
        for i in range(3):
            ras[int(self.ornt[i, 0])] = sizes[i]
        return ras[::-1].copy()

    @property
    def affine_dhw(self) -> np.ndarray:
        """Returns the (4, 4) affine mapping internal (d, h, w) indices to world RAS mm."""
        ras_affine = self.affine @ nib.orientations.inv_ornt_aff(self.ornt, self.disk_shape[:3])
        return ras_affine[:, [2, 1, 0, 3]]

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict from which `from_dict` rebuilds this geometry."""
        return {
            "affine": self.affine.tolist(),
            "disk_shape": list(self.disk_shape),
            "ornt": self.ornt.tolist(),
            "header_class": type(self.header).__name__,
            "header": base64.b64encode(self.header.binaryblock).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        """Returns the geometry stored by `to_dict`."""
        header_cls = nib.Nifti2Header if d["header_class"] == "Nifti2Header" else nib.Nifti1Header
        header = header_cls(base64.b64decode(d["header"]))
        return cls(
            affine=np.asarray(d["affine"], dtype=np.float64),
            disk_shape=tuple(int(s) for s in d["disk_shape"]),
            ornt=np.asarray(d["ornt"], dtype=np.float64),
            header=header,
        )


@dataclasses.dataclass
class Case:
    """One CT case in internal orientation: image (D, H, W) float32 HU, label (D, H, W) uint8."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: np.ndarray  # (sz, sy, sx) mm
    geometry: Geometry


def is_nifti_gz(path: PathLike) -> bool:
    """Returns whether `path` names a gzip-compressed single-file NIfTI (`.nii.gz`, any case)."""
    return pathlib.Path(path).name.lower().endswith(".nii.gz")


def _nifti_class_of(raw: bytes | memoryview) -> type[nib.Nifti1Image] | None:
    """Returns the single-file NIfTI class whose header `raw` starts with (nib.load's order), or None."""
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        if klass.header_class.may_contain_header(raw[: klass.header_class.sizeof_hdr]):
            return klass
    return None


def _gzip_damage(error: Exception) -> str | None:
    """Returns what is wrong with a gzip stream that raised `error`, or None for other errors."""
    if isinstance(error, EOFError):
        return "gzip data is truncated"
    if isinstance(error, gzip.BadGzipFile) and str(error).startswith("Not a gzipped file"):
        return f"not a gzip file ({error})"
    if isinstance(error, gzip.BadGzipFile | zlib.error | isal_zlib.error):  # CRC or length, bad deflate data
        return f"corrupt gzip data ({error})"
    return None


def _load_nifti_gz(path: pathlib.Path) -> tuple[nib.Nifti1Image, bytes | memoryview]:
    """Returns (image, decompressed bytes) of a `.nii.gz` inflated in memory, or raises DataError
    naming the file."""
    raw = parallel_gzip.inflate(path)  # rapidgzip on many cores when installed, verified; else None
    try:
        if raw is None:
            raw = igzip.decompress(path.read_bytes())  # every member's CRC and length are checked
    except (OSError, EOFError, zlib.error, isal_zlib.error) as e:
        damage = _gzip_damage(e)
        if damage is not None and _nifti_class_of(_partial_header(path)) is not None:
            # The header is intact: the damage is in the voxel data (as nibabel would report it).
            raise DataError(f"{path}: cannot read voxel data (truncated or corrupt file?): {damage}") from e
        raise DataError(f"{path}: cannot read as NIfTI (corrupt or not an image file): {damage or e}") from e
    klass = _nifti_class_of(raw)
    if klass is None:
        raise DataError(
            f"{path}: cannot read as NIfTI (corrupt or not an image file): no NIfTI-1 or NIfTI-2 header "
            f"in the {len(raw)} decompressed bytes"
        )
    try:
        return klass.from_stream(parallel_gzip.BufferStream(raw)), raw
    except Exception as e:  # nibabel raises many types for bad bytes
        raise DataError(f"{path}: cannot read as NIfTI (corrupt or not an image file): {e}") from e


def _partial_header(path: pathlib.Path) -> bytes:
    """Returns up to the first 540 decompressed bytes of a damaged `.nii.gz` (b"" if unreadable)."""
    try:
        with path.open("rb") as f:
            d = zlib.decompressobj(31)
            return d.decompress(f.read(1 << 16), nib.Nifti2Header.sizeof_hdr)
    except (OSError, zlib.error):
        return b""


def _raw_header(path: pathlib.Path, raw: bytes | memoryview | None) -> nib.Nifti1Header | None:
    """Returns the NIfTI header exactly as stored (nibabel's repairs not applied), or None."""
    if raw is None:
        try:
            with path.open("rb") as f:
                raw = f.read(nib.Nifti2Header.sizeof_hdr)
        except OSError:
            return None
    klass = _nifti_class_of(raw)
    if klass is None:
        return None
    try:
        return klass.header_class(raw[: klass.header_class.sizeof_hdr], check=False)
    except Exception:  # noqa: BLE001 - nibabel then reports the file itself
        return None


def header_anomalies(header: nib.Nifti1Header, path: PathLike) -> list[str]:
    """Returns the anomalies of a raw NIfTI header that nibabel repairs silently, each naming the file;
    raises DataError for a voxel size that is unknown (zero or non-finite pixdim and no sform)."""
    notes = []
    ndim = max(1, min(3, int(header["dim"][0])))
    pixdim = np.asarray(header["pixdim"][1 : 1 + ndim], dtype=np.float64)
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    shown = "(" + ", ".join(f"{v:g}" for v in pixdim) + ")"
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
        if sform_code <= 0:
            raise DataError(f"{path}: pixdim {shown} holds a zero or non-finite voxel size and there is no "
                            "sform, so the spacing is unknown (nibabel would assume 1 mm)")
        notes.append(f"{path}: pixdim {shown} holds a zero or non-finite voxel size; the spacing is "
                     "taken from the sform")
    elif np.any(pixdim < 0) and sform_code <= 0:
        notes.append(f"{path}: negative pixdim {shown}; their absolute values are used")
    if sform_code > 0 and qform_code > 0 and np.all(np.isfinite(pixdim)) and np.all(pixdim != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qform, sform = header.get_qform(), header.get_sform()
        difference = float(np.abs(qform - sform).max())
        if not np.isfinite(difference) or difference > QFORM_SFORM_ATOL_MM:
            notes.append(f"{path}: qform and sform disagree (by up to {difference:.3g} mm); the sform is used")
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if not np.isfinite(slope):
        notes.append(f"{path}: scale factor scl_slope is {slope:g}; voxels are read unscaled "
                     f"(slope 1, intercept 0)")
    elif slope != 0 and not np.isfinite(inter):
        raise DataError(f"{path}: scale factor scl_inter is {inter:g} (scl_slope {slope:g}); voxel values unknown")
    return notes


def load_image(path: PathLike) -> nib.spatialimages.SpatialImage:
    """Returns the nibabel image (header read, voxels not yet) or raises DataError naming the file.

    A `.nii.gz` is inflated completely here, so truncated or corrupt compressed data is reported by
    this function.
    """
    return _load(path)[0]


def _load(path: PathLike, stacklevel: int = 3) -> tuple[nib.spatialimages.SpatialImage, bytes | memoryview | None]:
    """Returns (`load_image`'s image, the inflated file bytes of a `.nii.gz` or None); its warnings
    name the line `stacklevel` frames up (the public reader's caller)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: file is not readable (permission denied)")
    raw = None
    # nibabel logs its header repairs without the file name: our own checks below name it.
    with nib.imageglobals.LoggingOutputSuppressor():
        if is_nifti_gz(path):
            img, raw = _load_nifti_gz(path)
        else:
            try:
                img = nib.load(path)
            except Exception as e:  # nibabel raises many types for bad bytes
                raise DataError(f"{path}: cannot read as NIfTI (corrupt or not an image file): {e}") from e
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise DataError(f"{path}: not a spatial image ({type(img).__name__})")
    header = _raw_header(path, raw) if isinstance(img, nib.Nifti1Image) else None
    for note in header_anomalies(header, path) if header is not None else ():
        warnings.warn(note, InputWarning, stacklevel=stacklevel)
    return img, raw


def check_spatial_shape(shape: tuple[int, ...], path: PathLike) -> None:
    """Raises DataError unless `shape` is 3D (trailing axes of length 1 are accepted)."""
    if len(shape) < 3:
        raise DataError(f"{path}: expected a 3D volume, got {len(shape)}D shape {tuple(shape)}")
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise DataError(
            f"{path}: expected a 3D volume, got a {len(shape)}D image of shape {tuple(shape)} "
            "(time series or multi-channel images are not supported)"
        )
    if min(shape[:3]) < 1:
        raise DataError(f"{path}: empty volume of shape {tuple(shape)}")


def read_voxels(img: nib.spatialimages.SpatialImage, path: PathLike, dtype: Any) -> np.ndarray:
    """Returns the voxel array (scaled, cast to `dtype`) or raises DataError for truncated data."""
    try:
        if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating):
            with np.errstate(over="ignore"):  # check_float32_range names the file instead
                data = img.get_fdata(dtype=dtype, caching="unchanged")
        else:
            data = np.asanyarray(img.dataobj)
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError from short reads
        raise DataError(f"{path}: cannot read voxel data (truncated or corrupt file?): {e}") from e
    data = np.asarray(data)
    if data.shape != tuple(img.shape):
        raise DataError(f"{path}: voxel data has shape {data.shape}, header says {img.shape}")
    return data


def check_finite(data: np.ndarray, path: PathLike) -> None:
    """Raises DataError naming the file if `data` holds NaN or infinite voxels."""
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        n = int(bad.sum())
        if n:
            n_nan = int(np.isnan(data).sum())
            raise DataError(f"{path}: {n} non-finite voxels ({n_nan} NaN, {n - n_nan} inf)")


def check_float32_range(img: nib.spatialimages.SpatialImage, data: np.ndarray, path: PathLike) -> None:
    """Raises DataError when finite stored values overflowed to inf in the float32 `data`."""
    if np.all(np.isfinite(data)):
        return
    stored = np.asanyarray(img.dataobj)  # float64 when scaled or stored as float64
    if not np.issubdtype(stored.dtype, np.floating) or stored.dtype.itemsize <= 4:
        return
    overflow = np.isfinite(stored) & ~np.isfinite(data)
    n = int(overflow.sum())
    if n:
        largest = float(np.abs(stored[overflow]).max())
        raise DataError(f"{path}: {n} voxels beyond float32's range (|value| up to {largest:.4g}); "
                        "not Hounsfield units")


def check_labels(data: np.ndarray, path: PathLike) -> np.ndarray:
    """Returns the label map as uint8, raising DataError for values outside {0, 1, 2}."""
    check_finite(data, path)
    if np.issubdtype(data.dtype, np.floating) and np.any(data != np.round(data)):
        raise DataError(f"{path}: label map holds non-integer values (expected 0, 1, 2)")
    if data.size == 0 or (data.min() >= 0 and data.max() <= 2):  # cheap common case, no sort
        return data.astype(np.uint8, copy=False)
    bad = [v for v in np.unique(data).tolist() if v not in LABEL_VALUES]
    shown = ", ".join(f"{v:g}" for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
    raise DataError(f"{path}: label values outside {{0, 1, 2}}: {shown}")


def remap_labels(data: np.ndarray, value_map: Sequence[tuple[int, int]], path: PathLike) -> np.ndarray:
    """Returns a label map with each (source value, target value) of `value_map` applied (uint8).

    A value the map does not name raises DataError naming the file (`data.layouts` builds the
    map from a dataset's declared labels, so such a value is undeclared in its dataset.json).
    """
    check_finite(data, path)
    values = np.unique(data)
    known = dict(value_map)
    undeclared = [v for v in values.tolist() if v not in known]
    if undeclared:
        raise DataError(f"{path}: label values {undeclared[:8]} are not among the dataset's labels "
                        f"{sorted(known)}")
    lookup = np.array([known[v] for v in values.tolist()], np.uint8)
    return lookup[np.searchsorted(values, data)]


def warn_if_not_hu(image: np.ndarray, path: PathLike) -> None:
    """Warns (HUWarning) when the intensity range does not look like CT in Hounsfield units."""
    sample = image[::4, ::4, ::4] if min(image.shape) >= 8 else image
    sample = sample.astype(np.float32, copy=False)  # an integer volume: the percentiles of its float32 values
    lo, hi = np.percentile(sample, [0.5, 99.5])
    reasons = []
    if lo > -200:
        reasons.append(f"no air or fat (0.5th percentile {lo:.4g})")
    if hi > 4000:
        reasons.append(f"99.5th percentile {hi:.4g} > 4000")
    if hi - lo < 100:
        reasons.append(f"intensity range {hi - lo:.4g} < 100")
    if reasons:
        warnings.warn(
            f"{path}: intensities do not look like Hounsfield units ({'; '.join(reasons)}); "
            "check RescaleSlope/Intercept or scl_slope/scl_inter",
            HUWarning,
            stacklevel=2,
        )


def geometry_of(img: nib.spatialimages.SpatialImage, path: PathLike) -> Geometry:
    """Returns the file's `Geometry`, raising DataError for a singular affine."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: affine is singular or not finite:\n{affine}")
    header = img.header
    if not isinstance(header, nib.Nifti1Header):  # Analyze and other formats: store as NIfTI-1
        header = nib.Nifti1Header.from_header(header)
    return Geometry(
        affine=affine,
        disk_shape=tuple(int(s) for s in img.shape),
        ornt=nib.orientations.io_orientation(affine),
        header=header.copy(),
    )


def to_internal(data: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Returns the on-disk array reoriented to internal (D, H, W) order (a contiguous copy)."""
    data = data.reshape(data.shape[:3])
    ras = nib.orientations.apply_orientation(data, geometry.ornt)
    return np.ascontiguousarray(ras.transpose(2, 1, 0))


def disk_view(array_dhw: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Returns an internal (D, H, W) array as a view in the file's on-disk axis order and shape (no copy:
    flips are negative strides; nibabel writes such a view slice by slice in NIfTI's order)."""
    if tuple(array_dhw.shape) != geometry.shape_dhw:
        raise ValueError(f"array shape {tuple(array_dhw.shape)} does not match the grid {geometry.shape_dhw}")
    to_disk = nib.orientations.ornt_transform(_RAS, geometry.ornt)
    disk = nib.orientations.apply_orientation(array_dhw.transpose(2, 1, 0), to_disk)
    return disk.reshape(geometry.disk_shape)  # trailing axes of length 1: still a view


def from_internal(array_dhw: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Returns an internal (D, H, W) array in the file's on-disk axis order and shape (Fortran order)."""
    disk = disk_view(array_dhw, geometry)
    # A C-ordered (D, H, W) array transposed is Fortran-ordered on disk axes, NIfTI's own order: keep it
    # (a copy only for flips/permutations).
    return np.asfortranarray(disk).reshape(geometry.disk_shape, order="F")


def internal_float32(disk: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Returns the on-disk array (any real dtype) as a contiguous internal (D, H, W) float32 copy.

    The same values as `to_internal(disk.astype(float32))`; the reorientation and the cast are one
    pass, split over slabs of slices on all cores.
    """
    view = nib.orientations.apply_orientation(disk.reshape(disk.shape[:3]), geometry.ornt).transpose(2, 1, 0)
    out = np.empty(view.shape, np.float32)

    def copy(start: int, stop: int) -> None:
        out[start:stop] = view[start:stop]  # casts while copying: no full-size temporary

    parallel_slabs(copy, out.shape[0])
    return out


# Integer voxel types whose float32 value equals nibabel's get_fdata(float32) when unscaled
# (nibabel goes through float64 for 32-bit integers; rounding once from the exact value is the same).
_EXACT_INTEGER_TYPES = ("i1", "u1", "i2", "u2", "i4", "u4")


def _unscaled_integer_voxels(img: nib.spatialimages.SpatialImage, raw: bytes | memoryview | None) -> np.ndarray | None:
    """Returns the on-disk integer voxels of an unscaled NIfTI as a zero-copy view of `raw`, or None
    when the file is not one (then nibabel reads it)."""
    if raw is None or not isinstance(img, nib.Nifti1Image):
        return None
    proxy = img.dataobj
    dtype = np.dtype(proxy.dtype)
    if dtype.kind not in "iu" or dtype.str[1:] not in _EXACT_INTEGER_TYPES:
        return None
    if float(proxy.slope) != 1.0 or float(proxy.inter) != 0.0:
        return None
    # The proxy's offset and order: the header copy nibabel keeps may have its vox_offset reset.
    if getattr(proxy, "order", "F") != "F":
        return None
    offset, shape = int(proxy.offset), tuple(int(s) for s in proxy.shape)
    if offset + dtype.itemsize * int(np.prod(shape)) > len(raw):
        return None  # truncated: nibabel reports it
    return np.ndarray(shape, dtype=dtype, buffer=raw, offset=offset, order="F")


def read_image(path: PathLike) -> tuple[np.ndarray, Geometry]:
    """Returns a CT volume as (D, H, W) float32 HU and its geometry, validating it.

    An unscaled integer `.nii.gz` (most CT) is converted straight from the inflated bytes, with no
    float32 copy in disk order; its values are finite by type. Otherwise nibabel scales the voxels
    and they are checked for overflow and non-finite values. Both give nibabel's float32 values.
    """
    return _read_image(path, native=False)


# On-disk types whose every value is exact in float32 and which numpy combines with float32 in float32:
# `read_image_native` keeps them, and the preprocessing computes with them what it computes with
# `read_image`'s float32 (`data.preprocess`).
NATIVE_TYPES = ("i1", "u1", "i2", "u2")


def read_image_native(path: PathLike) -> tuple[np.ndarray, Geometry]:
    """Returns a CT volume as (D, H, W) HU and its geometry as `read_image` does, except that an
    unscaled 8- or 16-bit integer `.nii.gz` (most CT: int16) stays in its on-disk type, a read-only
    view of the inflated bytes in internal orientation (flips and axis order are strides): no
    float32 copy, half the bytes for preprocessing to read. Every voxel equals `read_image`'s float32
    value; the same files are refused and the same warnings given.
    """
    return _read_image(path, native=True)


def _read_image(path: PathLike, native: bool) -> tuple[np.ndarray, Geometry]:
    img, raw = _load(path, stacklevel=4)  # the caller of read_image / read_image_native
    check_spatial_shape(img.shape, path)
    geometry = geometry_of(img, path)
    disk = _unscaled_integer_voxels(img, raw)
    if native and disk is not None and disk.dtype.str[1:] in NATIVE_TYPES:
        image = nib.orientations.apply_orientation(disk.reshape(disk.shape[:3]), geometry.ornt).transpose(2, 1, 0)
        warn_if_not_hu(image, path)
        return image, geometry
    if disk is None:
        raw = None  # nibabel's copy is read: free the inflated bytes before the internal copy
        data = read_voxels(img, path, np.float32)
        if not np.isfinite(data).all():
            check_float32_range(img, data, path)
            check_finite(data, path)
        disk = data
    image = internal_float32(disk, geometry)
    del disk, raw, img  # the inflated bytes (a view holds them) before the HU check
    warn_if_not_hu(image, path)
    return image, geometry


def read_label(path: PathLike, expected: Geometry | None = None,
               value_map: Sequence[tuple[int, int]] | None = None) -> tuple[np.ndarray, Geometry]:
    """Returns a label map as (D, H, W) uint8 and its geometry, checked against `expected`.

    `value_map`: (file value, label) pairs applied first (a dataset's label remapping).
    """
    img = load_image(path)
    check_spatial_shape(img.shape, path)
    geometry = geometry_of(img, path)
    if expected is not None:
        if tuple(img.shape[:3]) != tuple(expected.disk_shape[:3]):
            raise DataError(
                f"{path}: label shape {tuple(img.shape[:3])} does not match the image shape "
                f"{tuple(expected.disk_shape[:3])}"
            )
        if not np.allclose(geometry.affine, expected.affine, atol=AFFINE_ATOL_MM, rtol=1e-6):
            raise DataError(
                f"{path}: label affine does not match the image affine "
                f"(max difference {np.abs(geometry.affine - expected.affine).max():.3g}):\n"
                f"label:\n{geometry.affine}\nimage:\n{expected.affine}"
            )
    data = read_voxels(img, path, None)
    data = check_labels(data if value_map is None else remap_labels(data, value_map, path), path)
    return to_internal(data, expected or geometry), geometry


def read_case(image_path: PathLike, label_path: PathLike | None = None, case_id: str | None = None,
              value_map: Sequence[tuple[int, int]] | None = None) -> Case:
    """Returns the validated `Case` (image in HU, label or None) in internal (D, H, W) order."""
    image, geometry = read_image(image_path)
    label = None
    if label_path is not None:
        label, _ = read_label(label_path, expected=geometry, value_map=value_map)
    return Case(
        case_id=case_id or case_id_of(image_path),
        image=image,
        label=label,
        spacing=geometry.spacing,
        geometry=geometry,
    )


def save_nifti(img: nib.Nifti1Image, path: PathLike) -> pathlib.Path:
    """Returns `path` after writing `img` to it atomically (temp file, then rename).

    A single-file NIfTI to `.nii.gz` is serialised by nibabel slice by slice into a `GzipStream`,
    which deflates blocks with ISA-L on all cores while nibabel writes the next (level 1, like
    nibabel's default; one gzip member); anything else is written by `nib.save`.
    """
    with atomic_path(path) as tmp:  # the temporary name keeps `.nii.gz`: nibabel compresses by it
        if is_nifti_gz(path) and isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
            with open(tmp, "wb") as raw:
                stream = GzipStream(raw, GZIP_LEVEL)
                try:
                    img.to_stream(stream)  # header, then the voxels slice by slice
                except BaseException:
                    stream.abandon()
                    raise
                stream.finish()
        else:
            nib.save(img, tmp)
    return pathlib.Path(path)


def write_array(
    array_dhw: np.ndarray, geometry: Geometry, path: PathLike, dtype: Any = np.uint8
) -> pathlib.Path:
    """Returns `path` after atomically writing a (D, H, W) array with the input's affine/header."""
    disk = disk_view(np.asarray(array_dhw), geometry).astype(dtype, copy=False)
    header = geometry.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(None, None)
    img_cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = img_cls(disk, geometry.affine, header=header)
    return save_nifti(img, path)


def write_label_map(labels_dhw: np.ndarray, geometry: Geometry, path: PathLike) -> pathlib.Path:
    """Returns `path` after writing a (D, H, W) 0/1/2 label map as uint8 on the input's grid."""
    labels_dhw = np.asarray(labels_dhw)
    if labels_dhw.size and (labels_dhw.min() < 0 or labels_dhw.max() > 255):
        raise ValueError(f"{path}: label values do not fit uint8")
    return write_array(labels_dhw, geometry, path, np.uint8)
