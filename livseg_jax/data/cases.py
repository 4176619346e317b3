"""Case names: which files are NIfTI, a file's case id, their natural order, output names.

- A file's case id is its name without `.nii` / `.nii.gz` (`case_id_of`).
- Predictions and ground truth pair by `case_key`: LiTS `volume-N` and `segmentation-N` are both
  case `volume-N` (N without leading zeros); other names drop a trailing `_seg`, the suffix that
  `output_name` gives a prediction of a non-LiTS case.
- Folders list in natural order (`natural_key`: `volume-2` before `volume-10`).

Pure functions of names (only `is_nifti_file` looks at the disk); finding the files of a folder or
a dataset is `data.layouts`.
"""

from __future__ import annotations

import os
import pathlib
import re

NIFTI_ENDINGS = (".nii", ".nii.gz")
_LITS_NAME = re.compile(r"^(?:volume|segmentation)-(\d+)$")


def is_nifti_file(path: pathlib.Path) -> bool:
    """Returns whether `path` is a visible file with a `.nii` / `.nii.gz` ending (not macOS `._*`)."""
    return path.is_file() and path.name.endswith(NIFTI_ENDINGS) and not path.name.startswith(".")


def case_id_of(path: str | os.PathLike) -> str:
    """Returns a file's name without its `.nii` / `.nii.gz` ending."""
    name = pathlib.Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def natural_key(text: str) -> tuple:
    """Returns a sort key that orders embedded numbers numerically (`a2` before `a10`)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def case_key(path: str | os.PathLike) -> str:
    """Returns the case id a file belongs to: `volume-N` for LiTS names, else the name minus `_seg`."""
    cid = case_id_of(path)
    match = _LITS_NAME.match(cid)
    if match:
        return f"volume-{int(match.group(1))}"
    return cid[: -len("_seg")] if cid.endswith("_seg") else cid


def output_name(case_id: str) -> str:
    """Returns the label-map name of a case: segmentation-N.nii.gz for volume-N, else <id>_seg.nii.gz."""
    if case_id.startswith("volume-") and case_id[len("volume-"):].isdigit():
        return f"segmentation-{case_id[len('volume-'):]}.nii.gz"
    return f"{case_id}_seg.nii.gz"


def sidecar_path(output_path: str | os.PathLike, suffix: str) -> pathlib.Path:
    """Returns `<output without .nii[.gz]><suffix>` beside a label map (e.g. `_timings.json`)."""
    output_path = pathlib.Path(output_path)
    return output_path.with_name(case_id_of(output_path) + suffix)
