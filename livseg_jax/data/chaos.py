"""CHAOS CT importer: DICOM series + PNG liver masks -> LiTS layout (`volume-N.nii`, `segmentation-N.nii`).

    python -m livseg_jax.data.chaos --src CHAOS_Train_Sets/Train_Sets/CT --out DIR

SRC is the CHAOS `CT` folder (patient folders named by number: `1`, `2`, `5`, ...) or one patient
folder. Each patient folder holds `DICOM_anon/*.dcm` (one axial series) and `Ground/*.png` (one
liver mask per slice). N is the patient folder's number. The CHAOS CT livers are healthy (liver
donors): the labels are 0 background and 1 liver, no tumour.

Assumptions, from the challenge's data description and common converters (the dataset itself
is not redistributable, so they are checked on a sample built from 3D-IRCADb in the tests):

- The k-th mask, in natural order of the PNG names (`liver_GT_000.png`, `liver_GT_001.png`, ...),
  belongs to the k-th DICOM file in natural order of the file names (`i0000,0000b.dcm`, ...).
  Names sort slices consistently in one direction: the importer refuses a series whose
  positions along the slice normal are not monotonic in name order (then names do not count
  slices and the pairing would be a guess). Image and mask pairs are then sorted together by
  position along the slice normal.
- A PNG's pixel (row r, column c) is the DICOM pixel (r, c): same size, no flip or transpose.
  Mask values must be 0 and 255 (or 0 and 1); anything else is refused naming the file.
- The series is read by `livseg_jax.data.dicom` (shared with the 3D-IRCADb importer and
  `predict`), so its refusals apply: gantry tilt, two slices at one position, non-uniform slice
  steps, differing orientation, size or pixel spacing. The volume is HU (RescaleSlope /
  RescaleIntercept applied), int16 when it is integral and fits, else float32; the affine is the
  shared module's (LPS -> RAS). One series per folder (one SeriesInstanceUID); more are refused.

Each case is written whole or not at all, as by the 3D-IRCADb importer (`ircadb.write_lits_case`:
segmentation first, then the volume, each renamed into place when complete).
pydicom is an optional dependency: `pip install 'livseg_jax[dicom]'`; Pillow comes with matplotlib.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np

from livseg_jax import atomic_write
from livseg_jax.cli_errors import check_output_dir, run_main, total_size
from livseg_jax.data.cases import natural_key
from livseg_jax.data.dicom import Series, path_files, read_series, require_pydicom
from livseg_jax.data.ircadb import write_lits_case
from livseg_jax.data.nifti import DataError, PathLike


def read_ct_series(files: Sequence[pathlib.Path], where: pathlib.Path) -> tuple[Series, np.ndarray]:
    """Returns the series of `files` (read by `livseg_jax.data.dicom`, sorted along the slice normal)
    and `order`, the index into `files` of each sorted slice; refuses several series and names out
    of position order."""
    series = read_series(path_files(files), str(where))
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in series.datasets}
    if len(uids) > 1:
        raise DataError(f"{where}: {len(uids)} series (SeriesInstanceUID) in one folder")
    index = {str(f): i for i, f in enumerate(files)}
    order = np.array([index[name] for name in series.names])
    if not (np.array_equal(order, np.arange(len(files))) or np.array_equal(order, np.arange(len(files))[::-1])):
        raise DataError(f"{where}: the file names do not order the slices along the body axis; the "
                        "masks (paired with the DICOM files by name order) cannot be matched")
    return series, order


def read_masks(files: Sequence[pathlib.Path], shape: tuple[int, int]) -> np.ndarray:
    """Returns the PNG masks (n, rows, cols) as bool, refusing other sizes or values than 0/255, 0/1."""
    from PIL import Image  # Pillow: a dependency of matplotlib

    masks = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im)
        except OSError as e:
            raise DataError(f"{f}: cannot read as PNG: {e}") from e
        if arr.shape != shape:
            raise DataError(f"{f}: mask size {arr.shape} differs from the DICOM slices {shape}")
        values = set(np.unique(arr).tolist())
        if not (values <= {0, 255} or values <= {0, 1}):
            raise DataError(f"{f}: mask values {sorted(values)[:8]}: expected 0 and 255 (liver)")
        masks.append(arr > 0)
    return np.stack(masks)


def _files(folder: pathlib.Path, pattern: str) -> list[pathlib.Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder missing (CHAOS CT patient: DICOM_anon/ and Ground/)")
    files = sorted((p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"{folder}: no {pattern} files")
    return files


def import_patient(patient: PathLike, dst: PathLike, number: int) -> tuple[pathlib.Path, pathlib.Path, str]:
    """Returns (volume, segmentation, summary) after converting one CHAOS CT patient folder."""
    patient, dst = pathlib.Path(patient), pathlib.Path(dst)
    dicom_files = _files(patient / "DICOM_anon", "*.dcm")
    png_files = _files(patient / "Ground", "*.png")
    if len(dicom_files) != len(png_files):
        raise DataError(f"{patient}: {len(dicom_files)} DICOM files but {len(png_files)} PNG masks")
    series, order = read_ct_series(dicom_files, patient / "DICOM_anon")
    liver = read_masks(png_files, series.pixels.shape[1:])[order]
    hu = series.pixels
    integral = np.array_equal(hu, np.round(hu)) and hu.min() >= -32768 and hu.max() <= 32767
    image = hu.astype(np.int16 if integral else np.float32)
    affine = series.affine()
    image_path, label_path = write_lits_case(dst, number, image, liver.astype(np.uint8), affine, ending=".nii")
    spacing = nib.affines.voxel_sizes(affine)
    summary = (f"{patient.name} -> {image_path.name}, {label_path.name}: {'x'.join(map(str, image.shape[::-1]))} "
               f"voxels of {' x '.join(f'{s:.3g}' for s in spacing)} mm, liver {int(liver.sum())} voxels")
    return image_path, label_path, summary


def find_patients(src: PathLike) -> list[tuple[pathlib.Path, int]]:
    """Returns (patient folder, N) for the CHAOS CT folder SRC or one patient folder."""
    src = pathlib.Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    is_patient = (src / "DICOM_anon").is_dir()
    folders = [src] if is_patient else sorted((p for p in src.iterdir() if (p / "DICOM_anon").is_dir()),
                                              key=lambda p: natural_key(p.name))
    if not folders:
        raise DataError(f"{src}: no CHAOS CT patient folder (a folder holding DICOM_anon/ and Ground/)")
    bad = [f.name for f in folders if not f.name.isdigit()]
    if bad:
        raise DataError(f"{src}: patient folder {bad[0]!r} is not a number (CHAOS names them 1, 2, 5, ...)")
    return [(f, int(f.name)) for f in folders]


def import_chaos(src: PathLike, dst: PathLike, log: Callable[[str], None] | None = print) -> list[tuple]:
    """Returns (volume, segmentation) per patient after converting SRC into the LiTS layout in DST."""
    atomic_write.sweep_stale_temps(dst)
    written = []
    for folder, number in find_patients(src):
        image_path, label_path, summary = import_patient(folder, dst, number)
        if log is not None:
            log(summary)
        written.append((image_path, label_path))
    return written


def _run(argv: list[str]) -> int:
    """Parses the command line and imports; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m livseg_jax.data.chaos",
                                     description="Convert CHAOS CT (DICOM + PNG liver masks) to LiTS-layout NIfTI.")
    parser.add_argument("--src", required=True, help="the CHAOS CT folder (Train_Sets/CT) or one patient folder")
    parser.add_argument("--out", required=True, help="output folder for volume-N.nii and segmentation-N.nii")
    args = parser.parse_args(argv)
    atomic_write.exit_on_sigterm()
    patients = find_patients(args.src)
    require_pydicom()  # a missing optional dependency is reported before any work
    check_output_dir(args.out, need_bytes=2 * total_size([folder for folder, _ in patients]))  # .nii: uncompressed
    import_chaos(args.src, args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit status (1 with one `error:` line on bad input)."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
