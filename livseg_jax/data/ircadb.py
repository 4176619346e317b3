"""3D-IRCADb importer: DICOM patient folders -> LiTS layout (`volume-N.nii.gz`, `segmentation-N.nii.gz`).

    python -m livseg_jax.data.ircadb SRC DST [--tumor-masks PATTERN ...] [--liver-mask NAME]

SRC is one patient folder (holding `PATIENT_DICOM.zip` and `MASKS_DICOM.zip`, or those folders
unzipped) or a folder of patient folders (`3Dircadb1.1`, `3Dircadb1.2`, ...). N is the number at the
end of the patient folder's name. Zips are read in place, nothing is extracted.

- Series are read by `livseg_jax.data.dicom` (shared with `predict`): slices ordered by
  ImagePositionPatient projected on the slice normal (never by file name), and
  the affine comes from the DICOM geometry (ImageOrientationPatient, PixelSpacing, the positions),
  converted from DICOM's LPS to NIfTI's RAS world. The volume is int16 HU (RescaleSlope/Intercept).
- Labels: 1 where the liver mask is non-zero, 2 where any tumour mask is non-zero inside the liver.
  Tumour masks are the folders of MASKS_DICOM whose names match `--tumor-masks` (shell patterns,
  case-insensitive; default `livertumor*`, which leaves out cysts and 1.7's `tumor` outside the
  liver). Tumour voxels outside the liver are dropped and counted. What was merged is printed.

Each case is written whole or not at all: both files go to temporary names and are renamed into
place only when both are complete (segmentation first: a volume never appears without its labels).
Temporary files of an earlier importer that was killed are removed from DST at start.

pydicom is an optional dependency: `pip install 'livseg_jax[dicom]'`.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import pathlib
import re
import sys
import zipfile
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np

from livseg_jax import atomic_write
from livseg_jax.cli_errors import check_output_dir, run_main, total_size
from livseg_jax.data.cases import natural_key
from livseg_jax.data.dicom import (
    POSITION_TOL_MM,
    Series,
    SliceFile,
    nifti_image,
    path_file,
    read_series,
    require_pydicom,
    zip_member,
)
from livseg_jax.data.nifti import DataError, PathLike, save_nifti

DEFAULT_TUMOR_MASKS = ("livertumor*",)

Members = dict[str, list[SliceFile]]  # folder -> [(display name, opener)]


@dataclasses.dataclass
class ImportReport:
    """What `import_patient` read, merged and wrote for one patient."""

    patient: pathlib.Path
    image_path: pathlib.Path
    label_path: pathlib.Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # NIfTI (x, y, z) voxel sizes, mm
    liver_mask: str
    liver_voxels: int
    tumour_masks: list[tuple[str, int]]  # folder, non-zero voxels
    tumour_voxels: int  # label 2 voxels written
    tumour_voxels_dropped: int  # tumour-mask voxels outside the liver
    ignored_masks: list[str]

    def summary(self) -> str:
        """Returns a few human-readable lines saying what was merged."""
        tumours = ", ".join(f"{n} ({v} voxels)" for n, v in self.tumour_masks) or "none matched"
        return (
            f"{self.patient.name} -> {self.image_path.name}, {self.label_path.name}: "
            f"{'x'.join(map(str, self.shape))} voxels of "
            f"{' x '.join(f'{s:.3g}' for s in self.spacing)} mm\n"
            f"  liver (label 1) <- {self.liver_mask} ({self.liver_voxels} voxels)\n"
            f"  tumour (label 2) <- {tumours}; {self.tumour_voxels} voxels inside the liver, "
            f"{self.tumour_voxels_dropped} outside dropped\n"
            f"  not used: {', '.join(self.ignored_masks) or '-'}"
        )


# -------------------------------------------------------------------------------------- reading


def _members(patient: pathlib.Path, name: str) -> Members:
    """Returns the files of `<name>/` or `<name>.zip` in a patient folder, grouped by sub-folder."""
    groups: Members = {}
    folder, archive = patient / name, patient / f"{name}.zip"
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                key = path.parent.relative_to(folder).as_posix()
                groups.setdefault("" if key == "." else key, []).append(path_file(path))
        return groups
    if not archive.is_file():
        raise DataError(f"{patient}: neither {name}.zip nor {name}/ found")
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{archive}: cannot open zip archive: {e}") from e
    for info in zf.infolist():
        parts = pathlib.PurePosixPath(info.filename).parts
        if info.is_dir() or "__MACOSX" in parts or parts[-1].startswith("."):
            continue
        if parts[0] == name:  # the dataset's zips hold a top folder of the zip's own name
            parts = parts[1:]
        key = "/".join(parts[:-1])
        groups.setdefault(key, []).append(zip_member(zf, archive, info.filename))
    return groups


# -------------------------------------------------------------------------------------- merging


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns)


def _mask(series: Series, image: Series, folder: str) -> np.ndarray:
    if series.pixels.shape != image.pixels.shape or not np.allclose(
        series.positions, image.positions, atol=POSITION_TOL_MM
    ):
        raise DataError(
            f"{series.where}: mask {folder!r} does not lie on the image grid "
            f"(shape {series.pixels.shape} vs {image.pixels.shape}, or different slice positions)"
        )
    return series.pixels > 0


def import_patient(
    patient: PathLike,
    dst: PathLike,
    case_number: int,
    tumor_masks: Sequence[str] = DEFAULT_TUMOR_MASKS,
    liver_mask: str = "liver",
) -> ImportReport:
    """Returns the report after converting one patient folder to `volume-N`/`segmentation-N`.nii.gz."""
    patient, dst = pathlib.Path(patient), pathlib.Path(dst)
    image_files = _members(patient, "PATIENT_DICOM")
    if len(image_files) != 1:
        raise DataError(f"{patient}: PATIENT_DICOM holds several folders: {sorted(image_files)}")
    image = read_series(next(iter(image_files.values())), f"{patient}/PATIENT_DICOM")
    hu = np.round(image.pixels)
    if hu.min() < -32768 or hu.max() > 32767:
        raise DataError(f"{patient}: HU values {hu.min()}..{hu.max()} do not fit int16")

    masks = _members(patient, "MASKS_DICOM")
    by_lower = {k.lower(): k for k in masks}
    if liver_mask.lower() not in by_lower:
        raise DataError(f"{patient}/MASKS_DICOM: no {liver_mask!r} mask; found {sorted(masks)}")
    liver_key = by_lower[liver_mask.lower()]
    liver = _mask(read_series(masks[liver_key], f"{patient}/MASKS_DICOM/{liver_key}"), image, liver_key)
    tumour_keys = sorted((k for k in masks if k != liver_key and _matches(k, tumor_masks)), key=natural_key)
    tumour = np.zeros_like(liver)
    merged = []
    for key in tumour_keys:
        m = _mask(read_series(masks[key], f"{patient}/MASKS_DICOM/{key}"), image, key)
        merged.append((key, int(m.sum())))
        tumour |= m
    labels = liver.astype(np.uint8)
    labels[tumour & liver] = 2

    affine = image.affine()
    image_path, label_path = write_lits_case(dst, case_number, hu.astype(np.int16), labels, affine)
    return ImportReport(
        patient=patient,
        image_path=image_path,
        label_path=label_path,
        shape=tuple(int(s) for s in hu.shape[::-1]),
        spacing=tuple(float(s) for s in nib.affines.voxel_sizes(affine)),
        liver_mask=liver_key,
        liver_voxels=int(liver.sum()),
        tumour_masks=merged,
        tumour_voxels=int((labels == 2).sum()),
        tumour_voxels_dropped=int((tumour & ~liver).sum()),
        ignored_masks=sorted((k for k in masks if k != liver_key and k not in tumour_keys), key=natural_key),
    )


def write_lits_case(dst: pathlib.Path, number: int, image: np.ndarray, labels: np.ndarray,
                    affine: np.ndarray, ending: str = ".nii.gz") -> tuple[pathlib.Path, pathlib.Path]:
    """Returns the (volume, segmentation) paths `DST/volume-N<ending>`, `DST/segmentation-N<ending>`
    after writing a (slices, rows, cols) image and label map on a DICOM series' grid (`affine`)
    atomically as a pair; the CHAOS importer writes its cases through it too."""
    image_path, label_path = dst / f"volume-{number}{ending}", dst / f"segmentation-{number}{ending}"
    # Labels renamed first: a kill between the two renames leaves a lone segmentation, which
    # discovery refuses loudly, never a volume that training would take as unlabelled.
    with atomic_write.atomic_paths([label_path, image_path]) as temps:
        for data, tmp in zip((labels, image), temps, strict=True):
            arr = np.ascontiguousarray(data.transpose(2, 1, 0))  # (slices, rows, cols) -> (cols, rows, slices)
            save_nifti(nifti_image(arr, affine), tmp)
    return image_path, label_path


def _is_patient(folder: pathlib.Path) -> bool:
    return (folder / "PATIENT_DICOM.zip").is_file() or (folder / "PATIENT_DICOM").is_dir()


def find_patients(src: PathLike) -> list[tuple[pathlib.Path, int]]:
    """Returns (patient folder, case number N) for SRC: one patient folder or a folder of them."""
    src = pathlib.Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    folders = (
        [src]
        if _is_patient(src)
        else sorted(
            (p for p in src.iterdir() if p.is_dir() and _is_patient(p)), key=lambda p: natural_key(p.name)
        )
    )
    if not folders:
        raise DataError(f"{src}: no 3D-IRCADb patient folder (with PATIENT_DICOM.zip or PATIENT_DICOM/)")
    numbers: list[int | None] = []
    for folder in folders:
        match = re.search(r"(\d+)$", folder.name)
        numbers.append(int(match.group(1)) if match else None)
    taken = [n for n in numbers if n is not None]
    if len(set(taken)) != len(taken):
        raise DataError(f"{src}: patient folders end in the same number; import them into separate folders")
    spare = iter(n for n in range(10**6) if n not in set(taken))
    return [(f, n if n is not None else next(spare)) for f, n in zip(folders, numbers, strict=True)]


def import_ircadb(
    src: PathLike,
    dst: PathLike,
    tumor_masks: Sequence[str] = DEFAULT_TUMOR_MASKS,
    liver_mask: str = "liver",
    log: Callable[[str], None] | None = print,
) -> list[ImportReport]:
    """Returns one report per patient after converting SRC into the LiTS layout under DST."""
    atomic_write.sweep_stale_temps(dst)
    reports = []
    for folder, number in find_patients(src):
        report = import_patient(folder, dst, number, tumor_masks, liver_mask)
        if log is not None:
            log(report.summary())
        reports.append(report)
    return reports


def _run(argv: list[str]) -> int:
    """Parses the command line and imports; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m livseg_jax.data.ircadb",
        description="Convert 3D-IRCADb DICOM patient folders (zipped or not) to LiTS-layout NIfTI.",
    )
    parser.add_argument("src", help="a patient folder (e.g. 3Dircadb1.17) or a folder of patient folders")
    parser.add_argument("dst", help="output folder for volume-N.nii.gz and segmentation-N.nii.gz")
    parser.add_argument(
        "--tumor-masks",
        nargs="+",
        default=list(DEFAULT_TUMOR_MASKS),
        metavar="PATTERN",
        help="MASKS_DICOM folders merged into the tumour label (shell patterns, case-insensitive; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--liver-mask", default="liver", help="MASKS_DICOM folder of the liver (default: liver)"
    )
    args = parser.parse_args(argv)
    atomic_write.exit_on_sigterm()
    patients = find_patients(args.src)
    require_pydicom()  # a missing optional dependency is reported before any work
    # Each case is about the size of its DICOM input (int16 voxels, compressed).
    check_output_dir(args.dst, need_bytes=total_size([folder for folder, _ in patients]))
    import_ircadb(args.src, args.dst, args.tumor_masks, args.liver_mask)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit status (1 with one `error:` line on bad input)."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
