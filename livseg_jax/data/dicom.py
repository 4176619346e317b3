"""Reading one DICOM image series (a folder or a zip of slice files) as a NIfTI-convention volume.

The 3D-IRCADb importer (`livseg_jax.data.ircadb`) and `python -m livseg_jax.predict` both read
series here, so a DICOM patient predicted directly lies on exactly the grid the importer writes.

- `list_series(path)`: the image series of a folder (searched recursively) or a zip, by
  SeriesInstanceUID, with SeriesDescription and slice count. Files that are not DICOM (no `DICM`
  preamble) or not image slices (DICOMDIR, reports) are skipped and counted. Only headers are
  read (pydicom's `stop_before_pixels`; a zip member is inflated only that far).
- `select_series(series, uid)`: one series by UID; without a UID only a single-series input is
  accepted, otherwise the error lists the series and asks for `--series UID`.
- `read_series(files, where)`: slices sorted by ImagePositionPatient projected on the slice
  normal (the cross product of ImageOrientationPatient's row and column directions), never by
  file name; RescaleSlope/Intercept applied. Refused with a DataError naming the file: a
  non-orthonormal orientation, a gantry tilt (GantryDetectorTilt non-zero, or slice positions that
  drift off the normal), differing orientation, size or pixel spacing, two slices at one position,
  and non-uniform slice steps (a missing slice). The headers are checked and sorted first; then
  each slice's pixels are read once and written straight into one float32 volume laid out as
  the internal (D, H, W) array, so `image_and_geometry` returns it without a copy: reading a
  series needs one float32 volume of memory plus one slice (3.5 volumes before; docs/benchmarks.md,
  "Reading DICOM").
- `Series.names` are the slice files' names in slice order: an importer that pairs other files
  (CHAOS's PNG masks) with the DICOM files by name sorts them the same way.
- `Series.affine()`: the (4, 4) RAS affine of `Series.nifti_array()` (cols, rows, slices),
  converted from DICOM's LPS patient coordinates. `nifti_image` wraps both as the importer writes them.

pydicom is an optional dependency: `pip install 'livseg_jax[dicom]'`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import threading
import zipfile
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np

from livseg_jax.data import nifti
from livseg_jax.data.cases import natural_key
from livseg_jax.data.nifti import DataError, PathLike
from livseg_jax.data.slabs import parallel_slabs

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_TOL_MM = 1e-2  # slice positions agree within this (DS strings round to about 1e-6 mm)
_ORIENTATION_TOL = 1e-4
_PREAMBLE = slice(128, 132)

SliceFile = tuple[str, Callable[[], BinaryIO]]  # (display name, opener of its bytes as a binary stream)


def require_pydicom() -> Any:
    """Returns the pydicom module, or raises ImportError naming the `dicom` extra."""
    try:
        import pydicom
    except ImportError as e:
        raise ImportError(
            "reading DICOM needs pydicom, an optional dependency: "
            "pip install 'livseg_jax[dicom]' (or pip install pydicom)"
        ) from e
    return pydicom


@dataclasses.dataclass
class Series:
    """One DICOM series sorted along its slice normal: voxels (n, rows, cols), geometry and headers."""

    # (n, rows, cols) float32 after RescaleSlope/Intercept; None once dropped (`without_pixels`)
    pixels: np.ndarray | None
    positions: np.ndarray  # (n, 3) ImagePositionPatient, LPS mm
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    pixel_spacing: np.ndarray  # (2,) row spacing, column spacing (mm)
    where: str
    datasets: list = dataclasses.field(default_factory=list)  # pydicom Datasets in slice order, no pixels
    names: list = dataclasses.field(default_factory=list)  # the slice files' display names in slice order
    shape: tuple[int, ...] = ()  # (n, rows, cols); taken from `pixels` when not given

    def __post_init__(self) -> None:
        if not self.shape and self.pixels is not None:
            self.shape = tuple(int(s) for s in self.pixels.shape)

    def without_pixels(self) -> Series:
        """Returns this series with its headers and geometry but no pixel array (what DICOM outputs need)."""
        return dataclasses.replace(self, pixels=None)

    def affine(self) -> np.ndarray:
        """Returns the (4, 4) RAS affine of the NIfTI array (cols, rows, slices) of this series."""
        col_dir, row_dir = self.orientation[:3], self.orientation[3:]
        if len(self.positions) > 1:
            step = (self.positions[-1] - self.positions[0]) / (len(self.positions) - 1)
        else:
            step = np.cross(col_dir, row_dir)  # one slice: unit thickness along the normal
        lps = np.eye(4)
        lps[:3, 0] = col_dir * self.pixel_spacing[1]
        lps[:3, 1] = row_dir * self.pixel_spacing[0]
        lps[:3, 2] = step
        lps[:3, 3] = self.positions[0]
        return _LPS_TO_RAS @ lps

    def nifti_array(self) -> np.ndarray:
        """Returns the voxels in NIfTI order (cols, rows, slices) as a contiguous copy."""
        return np.ascontiguousarray(self.pixels.transpose(2, 1, 0))


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    """One image series found in a folder or zip: its UID, description and slice files."""

    uid: str
    description: str
    files: tuple[SliceFile, ...]

    def line(self) -> str:
        """Returns `UID  "description"  N slices` for listings and error messages."""
        return f"{self.uid}  {self.description!r}  {len(self.files)} slices"


# ------------------------------------------------------------------------------------- finding


def path_file(path: pathlib.Path) -> SliceFile:
    """Returns one file as a slice file for `read_series`, named by its path."""
    return (str(path), functools.partial(open, path, "rb"))


def path_files(paths: Sequence[pathlib.Path]) -> list[SliceFile]:
    """Returns `paths` as slice files for `read_series`, named by their paths, in the given order."""
    return [path_file(p) for p in paths]


# `ZipFile.open` is not thread-safe from Python 3.12 on: it skips the local header's extra field
# with a seek relative to the archive's shared file position, which another thread's read may have
# moved, and then fails with "Overlapped entries ... (possible zip bomb)" or inflates garbage
# ("invalid stored block lengths"). Slices are read on a thread pool, so opening is serialised;
# reading an opened member is safe (each read seeks to its own absolute position under the
# archive's lock) and stays parallel.
_ZIP_OPEN_LOCK = threading.Lock()


def _open_zip_member(zf: zipfile.ZipFile, member: str) -> BinaryIO:
    with _ZIP_OPEN_LOCK:
        return zf.open(member)


def zip_member(zf: zipfile.ZipFile, archive: PathLike, member: str) -> SliceFile:
    """Returns a zip archive's member as a slice file named `archive:member` (inflated as it is read)."""
    return (f"{archive}:{member}", functools.partial(_open_zip_member, zf, member))


def _folder_files(folder: pathlib.Path) -> list[SliceFile]:
    return path_files([
        p for p in sorted(folder.rglob("*"), key=lambda p: natural_key(str(p)))
        if p.is_file() and not p.name.startswith(".")
    ])


def _zip_files(archive: pathlib.Path) -> list[SliceFile]:
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{archive}: cannot open zip archive: {e}") from e
    files = []
    for info in sorted(zf.infolist(), key=lambda i: natural_key(i.filename)):
        parts = pathlib.PurePosixPath(info.filename).parts
        if info.is_dir() or "__MACOSX" in parts or parts[-1].startswith("."):
            continue
        files.append(zip_member(zf, archive, info.filename))
    return files


def input_files(path: PathLike) -> list[SliceFile]:
    """Returns the files of a folder (recursively) or a zip archive, in natural name order."""
    path = pathlib.Path(path)
    if path.is_dir():
        return _folder_files(path)
    if path.is_file():
        return _zip_files(path)
    raise DataError(f"{path}: DICOM input does not exist")


def is_dicom_input(path: PathLike) -> bool:
    """Returns whether `path` is a zip archive, or a folder holding a DICOM file and no NIfTI file."""
    path = pathlib.Path(path)
    if path.is_file():
        return zipfile.is_zipfile(path)
    if not path.is_dir() or any(path.rglob("*.nii*")):
        return False
    for p in path.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            with open(p, "rb") as f:
                if f.read(132)[_PREAMBLE] == b"DICM":
                    return True
    return False


def _listed_header(pydicom: Any, name: str, stream: BinaryIO) -> Any:
    """Returns the header (no pixel data read or inflated) of a file with a DICM preamble, else None."""
    if stream.read(132)[_PREAMBLE] != b"DICM":
        return None
    stream.seek(0)
    try:
        return pydicom.dcmread(stream, stop_before_pixels=True)
    except Exception as e:  # pydicom raises many types for damaged files
        raise DataError(f"{name}: cannot read the DICOM header: {e}") from e


def list_series(path: PathLike) -> list[SeriesInfo]:
    """Returns the image series of a DICOM folder or zip, sorted by UID; DataError when there are none.

    Only the headers are read (pydicom stops before the pixel data, and a zip member is inflated
    only that far): the pixels are read once, by `read_series` of the chosen series.
    """
    pydicom = require_pydicom()
    groups: dict[str, list[SliceFile]] = {}
    descriptions: dict[str, str] = {}
    skipped = 0
    for name, open_file in input_files(path):
        with open_file() as stream:
            ds = _listed_header(pydicom, name, stream)
        if ds is None or "ImagePositionPatient" not in ds or "Rows" not in ds or "SeriesInstanceUID" not in ds:
            skipped += 1  # not DICOM; DICOMDIR, structured reports, segmentations: not image slices
            continue
        uid = str(ds.SeriesInstanceUID)
        groups.setdefault(uid, []).append((name, open_file))
        descriptions.setdefault(uid, str(getattr(ds, "SeriesDescription", "") or ""))
    if not groups:
        raise DataError(f"{path}: no DICOM image series found ({skipped} file(s) were not DICOM image slices)")
    return [SeriesInfo(uid, descriptions[uid], tuple(groups[uid])) for uid in sorted(groups)]


def select_series(series: Sequence[SeriesInfo], uid: str | None, where: PathLike) -> SeriesInfo:
    """Returns the series with SeriesInstanceUID `uid`, or the only one when `uid` is None."""
    listing = "\n".join(s.line() for s in series)
    if uid is None:
        if len(series) != 1:
            raise DataError(f"{where}: holds {len(series)} image series; choose one with --series UID:\n{listing}")
        return series[0]
    for s in series:
        if s.uid == uid:
            return s
    raise DataError(f"{where}: no series with SeriesInstanceUID {uid}; the series are:\n{listing}")


# ------------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _SliceHeader:
    """What `read_series` needs of one slice's header, read before any pixel data."""

    name: str
    open_file: Callable[[], BinaryIO]
    position: np.ndarray
    orientation: np.ndarray
    spacing: np.ndarray
    size: tuple[int, int]  # (Rows, Columns)
    slope: float
    intercept: float
    dataset: Any  # the pydicom header, without pixel data


def _read_header(pydicom: Any, name: str, open_file: Callable[[], BinaryIO]) -> _SliceHeader:
    try:
        with open_file() as stream:
            ds = pydicom.dcmread(stream, stop_before_pixels=True, force=True)
        header = _SliceHeader(
            name=name, open_file=open_file,
            position=np.asarray(ds.ImagePositionPatient, dtype=np.float64),
            orientation=np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
            spacing=np.asarray(ds.PixelSpacing, dtype=np.float64),
            size=(int(ds.Rows), int(ds.Columns)),
            slope=float(getattr(ds, "RescaleSlope", 1) or 1),
            intercept=float(getattr(ds, "RescaleIntercept", 0) or 0),
            dataset=ds,
        )
        tilt = float(getattr(ds, "GantryDetectorTilt", 0) or 0)
    except Exception as e:  # pydicom raises many types for bad files and missing tags
        raise DataError(f"{name}: cannot read as a DICOM image slice: {e}") from e
    if header.position.shape != (3,) or header.orientation.shape != (6,) or header.spacing.shape != (2,):
        raise DataError(f"{name}: ImagePositionPatient, ImageOrientationPatient or PixelSpacing has the wrong length")
    if abs(tilt) > 1e-6:
        raise DataError(f"{name}: gantry tilt of {tilt} degrees is not supported; resample the series first")
    return header


def _read_pixels(pydicom: Any, header: _SliceHeader, out: np.ndarray) -> None:
    """Writes one slice's rescaled pixels into `out` (rows, cols); the file's bytes are then dropped."""
    try:
        with header.open_file() as stream:
            pixels = pydicom.dcmread(stream, force=True).pixel_array
    except Exception as e:  # pydicom raises many types for bad files and missing tags
        raise DataError(f"{header.name}: cannot read as a DICOM image slice: {e}") from e
    if pixels.ndim != 2:
        raise DataError(f"{header.name}: expected a 2D slice, got pixel data of shape {pixels.shape}")
    if pixels.shape != header.size:
        raise DataError(f"{header.name}: pixel data of shape {pixels.shape} but Rows, Columns {header.size}")
    if _exact_in_float32(pixels.dtype, header.slope, header.intercept):
        out[...] = pixels  # every intermediate value is an integer float32 holds exactly
        if header.slope != 1:
            out *= np.float32(header.slope)
        if header.intercept != 0:
            out += np.float32(header.intercept)
    else:  # float64 arithmetic rounded once to float32 (the assignment casts)
        with np.errstate(over="ignore"):  # overflow to inf is refused just below, naming the file
            out[...] = pixels.astype(np.float64) * header.slope + header.intercept
        nifti.check_finite(out, header.name)  # float pixels, or a slope beyond float32's range


def _exact_in_float32(dtype: np.dtype, slope: float, intercept: float) -> bool:
    """Returns whether pixel * slope + intercept, for every pixel of an integer `dtype`, is an integer
    below 2**24 at each step: float32 arithmetic then gives the float64 result rounded to float32."""
    if dtype.kind not in "iu" or dtype.itemsize > 2:
        return False
    if not (float(slope).is_integer() and float(intercept).is_integer()):
        return False
    largest = max(abs(int(np.iinfo(dtype).min)), int(np.iinfo(dtype).max))
    return largest * abs(slope) + abs(intercept) < 2**24


def _check_orientation(orientation: np.ndarray, name: str) -> None:
    col_dir, row_dir = orientation[:3], orientation[3:]
    if (abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(np.linalg.norm(row_dir) - 1) > 1e-3
            or abs(col_dir @ row_dir) > 1e-3):
        raise DataError(f"{name}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")


def _sorted_headers(headers: list[_SliceHeader], where: str) -> list[_SliceHeader]:
    """Returns the headers sorted along the slice normal, refusing a series that is not one regular grid."""
    first = headers[0]
    orientation, spacing = first.orientation, first.spacing
    _check_orientation(orientation, first.name)
    for h in headers[1:]:
        if h.size != first.size or not np.allclose(h.orientation, orientation, atol=_ORIENTATION_TOL):
            raise DataError(f"{h.name}: slice size or orientation differs from the rest of {where}")
        if not np.allclose(h.spacing, spacing, atol=1e-4):
            raise DataError(f"{h.name}: pixel spacing {h.spacing} differs from {spacing} in {where}")
    normal = np.cross(orientation[:3], orientation[3:])
    headers = sorted(headers, key=lambda h: float(h.position @ normal))
    positions = np.stack([h.position for h in headers])
    offsets = positions - positions[0]
    off_normal = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if off_normal.max() > POSITION_TOL_MM:
        i = int(np.argmax(off_normal))
        raise DataError(
            f"{headers[i].name}: slice lies {off_normal[i]:.3g} mm off the slice normal through the first slice "
            f"of {where} (gantry tilt or sheared stack); resample the series first"
        )
    steps = np.diff(offsets @ normal)
    if steps.size:
        if steps.min() < POSITION_TOL_MM:
            i = int(np.argmin(steps))
            raise DataError(f"{headers[i + 1].name}: same slice position as {headers[i].name}")
        if steps.max() - steps.min() > max(POSITION_TOL_MM, 0.01 * np.median(steps)):
            raise DataError(
                f"{where}: slice spacing is not uniform (steps {steps.min():.4g} to {steps.max():.4g} mm); "
                "a slice may be missing"
            )
    return headers


def internal_slices_view(shape_slices: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Returns an uninitialised (slices, rows, cols) float32 view of a C-contiguous internal (D, H, W)
    array on the grid of `affine` (the NIfTI (cols, rows, slices) affine of `Series.affine`).

    Filling the view fills the internal volume `image_and_geometry` returns, without a copy.
    """
    n, rows, cols = (int(s) for s in shape_slices)
    ornt = nib.orientations.io_orientation(affine)
    ras_shape = [0, 0, 0]
    for disk_axis, size in enumerate((cols, rows, n)):
        ras_shape[int(ornt[disk_axis, 0])] = size
    internal = np.empty(ras_shape[::-1], np.float32)  # (z, y, x) = (D, H, W)
    to_disk = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    disk = nib.orientations.apply_orientation(internal.transpose(2, 1, 0), to_disk)  # views: flips, transposes
    return disk.transpose(2, 1, 0)


def read_series(files: Sequence[SliceFile], where: str) -> Series:
    """Returns the slices of one DICOM series sorted by position along the slice normal.

    The headers are read first (no pixel data) to check and sort the slices; then each slice's
    pixels are read once (slabs of slices on the shared thread pool, `slabs.parallel_slabs`),
    rescaled, and written straight into the volume, laid out in memory as the internal (D, H, W)
    array (`internal_slices_view`), so `image_and_geometry` copies nothing.
    """
    pydicom = require_pydicom()
    if not files:
        raise DataError(f"{where}: no DICOM files")
    headers = _sorted_headers([_read_header(pydicom, name, open_file) for name, open_file in files], where)
    series = Series(
        pixels=None,
        positions=np.stack([h.position for h in headers]),
        orientation=headers[0].orientation,
        pixel_spacing=headers[0].spacing,
        where=where,
        datasets=[h.dataset for h in headers],
        names=[h.name for h in headers],
        shape=(len(headers), *headers[0].size),
    )
    pixels = internal_slices_view(series.shape, series.affine())

    def read_slab(start: int, stop: int) -> None:  # inflating and casting release the GIL
        for k in range(start, stop):
            _read_pixels(pydicom, headers[k], pixels[k])

    parallel_slabs(read_slab, len(headers))
    series.pixels = pixels
    return series


def read_dicom_series(path: PathLike, series_uid: str | None = None) -> Series:
    """Returns the series `series_uid` (or the only series) of a DICOM folder or zip, sorted."""
    chosen = select_series(list_series(path), series_uid, path)
    return read_series(chosen.files, f"{path} (series {chosen.uid})")


# ---------------------------------------------------------------------------- NIfTI convention


def nifti_image(array_xyz: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Returns a NIfTI image of a (cols, rows, slices) array with `affine` as scanner qform and sform."""
    img = nib.Nifti1Image(array_xyz, affine)
    img.header.set_qform(affine, code=1)  # scanner coordinates
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def image_and_geometry(series: Series) -> tuple[np.ndarray, nifti.Geometry]:
    """Returns the series as an internal (D, H, W) float32 HU volume and the NIfTI geometry the
    importer would write for it (what `nifti.read_image` returns for the imported volume).

    A series from `read_series` already lies in memory as that volume, its slices checked for
    non-finite values as they were read: it is returned as it is (no copy; it shares memory with
    `series.pixels`). Other pixel arrays are copied once (`nifti.internal_float32`) and checked.
    """
    if series.pixels is None:
        raise ValueError(f"{series.where}: the series' pixels were dropped (Series.without_pixels)")
    disk = series.pixels.transpose(2, 1, 0)  # (cols, rows, slices), a view
    geometry = nifti.geometry_of(nifti_image(disk, series.affine()), series.where)
    image = nib.orientations.apply_orientation(disk, geometry.ornt).transpose(2, 1, 0)
    if image.dtype != np.float32 or not image.flags.c_contiguous:
        image = nifti.internal_float32(disk, geometry)
        nifti.check_finite(image, series.where)
    # else: `read_series` checked each slice as it was read (no volume-sized boolean temporary)
    nifti.warn_if_not_hu(image, series.where)
    return image, geometry


def slice_order(array_dhw: np.ndarray, geometry: nifti.Geometry) -> np.ndarray:
    """Returns an internal (D, H, W) array on a series' grid in DICOM order (slices, rows, cols)."""
    return np.ascontiguousarray(nifti.from_internal(array_dhw, geometry).transpose(2, 1, 0))
