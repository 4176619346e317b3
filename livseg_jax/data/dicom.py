"""Reading one DICOM image series (a folder or a zip of slice files) as a NIfTI-convention volume.

The 3D-IRCADb importer (`livseg_jax.data.ircadb`) and `python -m livseg_jax.predict` both read
series here, so a DICOM patient predicted directly lies on exactly the grid the importer writes.

- `list_series(path)`: the image series of a folder (searched recursively) or a zip, by
  SeriesInstanceUID, with SeriesDescription and slice count. Files that are not DICOM (no `DICM`
  preamble) or not image slices (DICOMDIR, reports) are skipped and counted.
- `select_series(series, uid)`: one series by UID; without a UID only a single-series input is
  accepted, otherwise the error lists the series and asks for `--series UID`.
- `read_series(files, where)`: slices sorted by ImagePositionPatient projected on the slice
  normal (the cross product of ImageOrientationPatient's row and column directions), never by
  file name; RescaleSlope/Intercept applied. Refused with a DataError naming the file: a
  non-orthonormal orientation, a gantry tilt (GantryDetectorTilt non-zero, or slice positions that
  drift off the normal), differing orientation, size or pixel spacing, two slices at one position,
  and non-uniform slice steps (a missing slice).
- `Series.names` are the slice files' names in slice order: an importer that pairs other files
  (CHAOS's PNG masks) with the DICOM files by name sorts them the same way.
- `Series.affine()`: the (4, 4) RAS affine of `Series.nifti_array()` (cols, rows, slices),
  converted from DICOM's LPS patient coordinates. `nifti_image` wraps both as the importer writes them.

pydicom is an optional dependency: `pip install 'livseg_jax[dicom]'`.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from livseg_jax.data import nifti
from livseg_jax.data.cases import natural_key
from livseg_jax.data.nifti import DataError, PathLike

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_TOL_MM = 1e-2  # slice positions agree within this (DS strings round to about 1e-6 mm)
_ORIENTATION_TOL = 1e-4
_PREAMBLE = slice(128, 132)

SliceFile = tuple[str, Callable[[], bytes]]  # (display name, reader of its bytes)


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

    pixels: np.ndarray  # (n, rows, cols) float32 after RescaleSlope/Intercept
    positions: np.ndarray  # (n, 3) ImagePositionPatient, LPS mm
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    pixel_spacing: np.ndarray  # (2,) row spacing, column spacing (mm)
    where: str
    datasets: list = dataclasses.field(default_factory=list)  # pydicom Datasets in slice order, no pixels
    names: list = dataclasses.field(default_factory=list)  # the slice files' display names in slice order

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
        """Returns the voxels in NIfTI order (cols, rows, slices)."""
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


def path_files(paths: Sequence[pathlib.Path]) -> list[SliceFile]:
    """Returns `paths` as slice files for `read_series`, named by their paths, in the given order."""
    return [(str(p), p.read_bytes) for p in paths]


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
        files.append((f"{archive}:{info.filename}", lambda n=info.filename: zf.read(n)))
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


def list_series(path: PathLike) -> list[SeriesInfo]:
    """Returns the image series of a DICOM folder or zip, sorted by UID; DataError when there are none."""
    pydicom = require_pydicom()
    groups: dict[str, list[SliceFile]] = {}
    descriptions: dict[str, str] = {}
    skipped = 0
    for name, read in input_files(path):
        data = read()
        if data[_PREAMBLE] != b"DICM":
            skipped += 1
            continue
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception as e:  # pydicom raises many types for damaged files
            raise DataError(f"{name}: cannot read the DICOM header: {e}") from e
        if "ImagePositionPatient" not in ds or "Rows" not in ds or "SeriesInstanceUID" not in ds:
            skipped += 1  # DICOMDIR, structured reports, segmentations: not image slices
            continue
        uid = str(ds.SeriesInstanceUID)
        groups.setdefault(uid, []).append((name, read))  # read again for the pixels: memory stays one slice
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


def _read_slice(pydicom: Any, name: str, data: bytes) -> tuple:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        pixels = ds.pixel_array.astype(np.float64)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        spacing = np.asarray(ds.PixelSpacing, dtype=np.float64)
        tilt = float(getattr(ds, "GantryDetectorTilt", 0) or 0)
    except Exception as e:  # pydicom raises many types for bad files and missing tags
        raise DataError(f"{name}: cannot read as a DICOM image slice: {e}") from e
    if pixels.ndim != 2:
        raise DataError(f"{name}: expected a 2D slice, got pixel data of shape {pixels.shape}")
    if position.shape != (3,) or orientation.shape != (6,) or spacing.shape != (2,):
        raise DataError(f"{name}: ImagePositionPatient, ImageOrientationPatient or PixelSpacing has the wrong length")
    if abs(tilt) > 1e-6:
        raise DataError(f"{name}: gantry tilt of {tilt} degrees is not supported; resample the series first")
    del ds.PixelData  # the headers are kept for DICOM outputs; the voxels live in `pixels`
    return name, (pixels * slope + intercept).astype(np.float32), position, orientation, spacing, ds


def _check_orientation(orientation: np.ndarray, name: str) -> None:
    col_dir, row_dir = orientation[:3], orientation[3:]
    if (abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(np.linalg.norm(row_dir) - 1) > 1e-3
            or abs(col_dir @ row_dir) > 1e-3):
        raise DataError(f"{name}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")


def read_series(files: Sequence[SliceFile], where: str) -> Series:
    """Returns the slices of one DICOM series sorted by position along the slice normal."""
    pydicom = require_pydicom()
    if not files:
        raise DataError(f"{where}: no DICOM files")
    slices = [_read_slice(pydicom, name, read()) for name, read in files]
    first_name, first_pixels, _, orientation, spacing, _ = slices[0]
    _check_orientation(orientation, first_name)
    for name, pixels, _, o, s, _ in slices[1:]:
        if pixels.shape != first_pixels.shape or not np.allclose(o, orientation, atol=_ORIENTATION_TOL):
            raise DataError(f"{name}: slice size or orientation differs from the rest of {where}")
        if not np.allclose(s, spacing, atol=1e-4):
            raise DataError(f"{name}: pixel spacing {s} differs from {spacing} in {where}")
    normal = np.cross(orientation[:3], orientation[3:])
    slices.sort(key=lambda s: float(s[2] @ normal))
    positions = np.stack([s[2] for s in slices])
    offsets = positions - positions[0]
    off_normal = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if off_normal.max() > POSITION_TOL_MM:
        i = int(np.argmax(off_normal))
        raise DataError(
            f"{slices[i][0]}: slice lies {off_normal[i]:.3g} mm off the slice normal through the first slice "
            f"of {where} (gantry tilt or sheared stack); resample the series first"
        )
    steps = np.diff(offsets @ normal)
    if steps.size:
        if steps.min() < POSITION_TOL_MM:
            i = int(np.argmin(steps))
            raise DataError(f"{slices[i + 1][0]}: same slice position as {slices[i][0]}")
        if steps.max() - steps.min() > max(POSITION_TOL_MM, 0.01 * np.median(steps)):
            raise DataError(
                f"{where}: slice spacing is not uniform (steps {steps.min():.4g} to {steps.max():.4g} mm); "
                "a slice may be missing"
            )
    return Series(
        pixels=np.stack([s[1] for s in slices]),
        positions=positions,
        orientation=orientation,
        pixel_spacing=spacing,
        where=where,
        datasets=[s[5] for s in slices],
        names=[s[0] for s in slices],
    )


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
    importer would write for it (what `nifti.read_image` returns for the imported volume)."""
    img = nifti_image(series.nifti_array(), series.affine())
    geometry = nifti.geometry_of(img, series.where)
    data = np.asarray(img.dataobj, dtype=np.float32)
    nifti.check_finite(data, series.where)
    image = nifti.to_internal(data, geometry)
    nifti.warn_if_not_hu(image, series.where)
    return image, geometry


def slice_order(array_dhw: np.ndarray, geometry: nifti.Geometry) -> np.ndarray:
    """Returns an internal (D, H, W) array on a series' grid in DICOM order (slices, rows, cols)."""
    return np.ascontiguousarray(nifti.from_internal(array_dhw, geometry).transpose(2, 1, 0))
