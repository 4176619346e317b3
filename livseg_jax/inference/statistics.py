"""Per-case numbers from a predicted label map, without ground truth (`predict --statistics`).

For a (D, H, W) 0/1/2 label map on a CT's grid, its affine (`nifti.Geometry.affine_dhw`: internal
index -> world mm, NIfTI RAS+) and the CT in HU:

- liver volume (ml): labels 1 and 2 (the tumour lies inside the liver, LiTS convention);
- tumour burden: tumour volume (ml) and its percentage of the liver volume (0 without liver);
- lesions: connected components of the tumour (label 2) with the neighbourhood of
  `livseg_jax.metrics` (`DEFAULT_LESION_CONNECTIVITY`: 26-neighbourhood), numbered 1, 2, ... by
  decreasing volume (ties: the first voxel in (D, H, W) scan order first). Per lesion:
  - `volume_ml`: voxel count times the voxel volume |det(affine)|;
  - `longest_axial_diameter_mm`: the largest in-plane Feret (caliper) diameter over the lesion's
    axial slices (internal D is the axis nearest superior-inferior). Each pixel counts with its
    full square footprint: the diameter is the longest distance between corners of the lesion's
    pixels in one slice (a 3 x 2 block of 1 mm pixels measures sqrt(13) mm), edge to edge as a
    caliper (RECIST's longest diameter) measures;
  - `major_axis_mm`: the 3D major axis from the principal axes of the voxel-centre cloud in world
    mm, sqrt(20 lambda_max) with lambda_max the largest eigenvalue of the coordinates' covariance
    (`metrics.major_axis_length`: a solid ellipsoid's full longest axis, scikit-image's
    `axis_major_length`; 0 for one voxel);
  - `centroid_ras_mm`: the mean voxel centre through the affine in NIfTI's world frame, RAS+
    (+x towards the patient's right, +y anterior, +z superior); `centroid_lps_mm`: the same point
    in DICOM's patient frame, LPS+ (+x left, +y posterior, +z superior), i.e. (-x, -y, z);
  - `mean_hu`: the mean CT value over the lesion's voxels.

All functions are pure NumPy / SciPy; `write_statistics` writes the JSON and CSV atomically.
"""

from __future__ import annotations

import csv
import io
import itertools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from livseg_jax import atomic_write
from livseg_jax.data.regions import label_components
from livseg_jax.metrics import DEFAULT_LESION_CONNECTIVITY, major_axis_length

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])  # DICOM patient (LPS+) = NIfTI world (RAS+) with x, y negated
LESION_COLUMNS = ("lesion", "volume_ml", "longest_axial_diameter_mm", "major_axis_mm",
                  "centroid_ras_x_mm", "centroid_ras_y_mm", "centroid_ras_z_mm",
                  "centroid_lps_x_mm", "centroid_lps_y_mm", "centroid_lps_z_mm", "mean_hu", "voxels")
_DIGITS = 4  # rounding of the written numbers (0.1 um, 0.1 ul: far below a voxel)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Returns the volume of one voxel in ml (|det| of the affine's 3x3 part, mm^3 / 1000)."""
    return float(abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3]))) / 1000.0


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Returns the lengths (mm) of the affine's three index axes (its columns), shape (3,)."""
    return np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)


def lesion_components(tumour: np.ndarray,
                      connectivity: int = DEFAULT_LESION_CONNECTIVITY) -> tuple[np.ndarray, int]:
    """Returns (int32 lesion map, n): components of `tumour` numbered 1..n by decreasing size."""
    labels, n = label_components(np.asarray(tumour, bool), connectivity)
    if n == 0:
        return labels.astype(np.int32), 0
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-counts, kind="stable")  # scipy numbers components in scan order: ties keep it
    new_number = np.zeros(n + 1, np.int32)
    new_number[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    return new_number[labels], n


def feret_diameter_2d(mask_hw: np.ndarray, spacing_hw: Sequence[float]) -> float:
    """Returns the largest corner-to-corner distance (mm) of a 2D mask's pixels (0 when empty)."""
    rows, cols = np.nonzero(mask_hw)
    if rows.size == 0:
        return 0.0
    # The corners of every pixel: (r, c), (r+1, c), (r, c+1), (r+1, c+1) in pixel-edge units.
    corners = np.unique(np.concatenate([np.stack([rows + dr, cols + dc], axis=1)
                                        for dr, dc in itertools.product((0, 1), repeat=2)]), axis=0)
    points = corners * np.asarray(spacing_hw, np.float64)
    hull = points[ConvexHull(points).vertices]  # never degenerate: one pixel already spans a square
    diff = hull[:, None, :] - hull[None, :, :]
    return float(np.sqrt((diff ** 2).sum(-1).max()))


def longest_axial_diameter(mask_dhw: np.ndarray, spacing_hw: Sequence[float]) -> float:
    """Returns the largest in-plane Feret diameter (mm) over the axial slices of a (D, H, W) mask."""
    slices = np.nonzero(mask_dhw.any(axis=(1, 2)))[0]
    return max((feret_diameter_2d(mask_dhw[d], spacing_hw) for d in slices), default=0.0)


def _rounded(values: Any) -> Any:
    return [round(float(v), _DIGITS) for v in values]


def lesion_statistics(lesions: np.ndarray, n: int, image: np.ndarray, affine_dhw: np.ndarray) -> list[dict[str, Any]]:
    """Returns one record per lesion 1..n of a lesion map (see the module docstring for the fields)."""
    affine_dhw = np.asarray(affine_dhw, np.float64)
    spacing = voxel_spacing(affine_dhw)
    voxel_ml = voxel_volume_ml(affine_dhw)
    records = []
    for number, box in enumerate(ndimage.find_objects(lesions, max_label=n) if n else [], start=1):
        mask = lesions[box] == number
        idx = np.stack(np.nonzero(mask), axis=1).astype(np.float64) + [s.start for s in box]
        world = idx @ affine_dhw[:3, :3].T + affine_dhw[:3, 3]  # voxel centres, RAS+ mm
        centroid = world.mean(axis=0)
        records.append({
            "lesion": number,
            "voxels": int(idx.shape[0]),
            "volume_ml": round(idx.shape[0] * voxel_ml, _DIGITS),
            "longest_axial_diameter_mm": round(longest_axial_diameter(mask, spacing[1:]), _DIGITS),
            "major_axis_mm": round(major_axis_length(world), _DIGITS),
            "centroid_ras_mm": _rounded(centroid),
            "centroid_lps_mm": _rounded(centroid * RAS_TO_LPS),
            "mean_hu": round(float(image[box][mask].mean(dtype=np.float64)), _DIGITS),
        })
    return records


def case_statistics(labels: np.ndarray, image: np.ndarray, affine_dhw: np.ndarray,
                    connectivity: int = DEFAULT_LESION_CONNECTIVITY,
                    lesions: tuple[np.ndarray, int] | None = None) -> dict[str, Any]:
    """Returns the case's liver volume, tumour burden and per-lesion records (module docstring).

    `lesions`: `lesion_components(labels == 2, connectivity)` when the caller already has it (the
    PNG of `predict --statistics --png` numbers the same lesions): the tumour is labelled once.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape != np.shape(image):
        raise ValueError(f"statistics: label map {labels.shape} and image {np.shape(image)} must be "
                         "(D, H, W) arrays of one shape")
    voxel_ml = voxel_volume_ml(affine_dhw)
    liver_ml = int(np.count_nonzero(labels >= 1)) * voxel_ml
    tumour = labels == 2
    tumour_ml = int(np.count_nonzero(tumour)) * voxel_ml
    lesions, n = lesion_components(tumour, connectivity) if lesions is None else lesions
    if lesions.shape != labels.shape:
        raise ValueError(f"statistics: lesion map {lesions.shape} and label map {labels.shape} differ in shape")
    return {
        "voxel_volume_ml": voxel_ml,
        "lesion_connectivity": int(connectivity),
        "liver_volume_ml": round(liver_ml, _DIGITS),
        "tumour_volume_ml": round(tumour_ml, _DIGITS),
        "tumour_burden_percent": round(100.0 * tumour_ml / liver_ml, _DIGITS) if liver_ml > 0 else 0.0,
        "number_of_lesions": n,
        "lesions": lesion_statistics(lesions, n, image, affine_dhw),
    }


def lesion_rows(case_id: str, stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Returns the CSV rows (one per lesion, `case_id` first) of `case_statistics` output."""
    rows = []
    for lesion in stats["lesions"]:
        centroids = {f"centroid_{frame}_{axis}_mm": lesion[f"centroid_{frame}_mm"][i]
                     for frame in ("ras", "lps") for i, axis in enumerate("xyz")}
        rows.append({"case_id": case_id, **{c: centroids.get(c, lesion.get(c)) for c in LESION_COLUMNS}})
    return rows


def statistics_csv(case_id: str, stats: Mapping[str, Any]) -> str:
    """Returns the per-lesion CSV text (a header line even without lesions)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=("case_id", *LESION_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(lesion_rows(case_id, stats))
    return out.getvalue()


def write_statistics(json_path: pathlib.Path, csv_path: pathlib.Path, case_id: str,
                     stats: Mapping[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
    """Returns (JSON path, CSV path) after writing the case's statistics to both atomically."""
    atomic_write.write_json(json_path, {"case_id": case_id, **stats})
    atomic_write.write_text(csv_path, statistics_csv(case_id, stats))
    return pathlib.Path(json_path), pathlib.Path(csv_path)
