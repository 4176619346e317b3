"""Evaluation metrics of SPEC §3 for binary 3D masks with voxel spacing (numpy / scipy, host side).

Per case (`binary_metrics`): Dice, IoU, precision, recall, RVD, ASD (mm), HD95 (mm), plus the voxel
counts that global Dice needs. Across cases: `summarize` (mean ± std, undefined values counted,
not averaged), `global_dice` / `global_dice_from_rows` (Dice over all voxels of all cases).
Lesions: `lesion_detection` (true tumours hit / missed, false-positive components) and the
tumour-size study of the paper's Table 6 (`tumor_size_study`).

Conventions (docs/metrics.md has the full table):
- `pred` (A) and `truth` (B) are 3D arrays of the same shape in any axis order, as long as
  `spacing` (mm per voxel) lists the same axes in the same order. Non-zero means foreground.
- Surfaces are medpy's: the mask minus its binary erosion with the 6-neighbourhood (connectivity
  1), with everything outside the array counted as background. Distances are Euclidean in mm
  between voxel centres. ASD is the *symmetric* average surface distance, the mean over the union
  of both directed distance sets (= `medpy.metric.binary.assd`); HD95 is the 95th percentile
  (linear interpolation) of that same union (= `medpy.metric.binary.hd95`).
- Empty masks: both empty is perfect agreement (Dice = IoU = precision = recall = 1, RVD = ASD =
  HD95 = 0). A ratio whose denominator is empty while the other mask is not is undefined and is
  NaN (precision with empty A, recall and RVD with empty B); distances with exactly one empty mask
  are NaN. `summarize` skips NaN explicitly and reports how many it skipped.

Speed: all work happens inside the tight bounding box of A ∪ B (outside it both masks are
background, which is what the erosion assumes beyond the array edge, so nothing changes); the
distance transforms run there, never over the whole volume and never over all surface-voxel pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from livseg_jax.data.regions import bbox_of, component_sizes, label_components, union_box

METRIC_NAMES = ("dice", "iou", "precision", "recall", "rvd", "asd", "hd95")
# Lesions touching only by an edge or a corner are one lesion (26-neighbourhood), as is usual for
# tumour counting; pass connectivity=1 for face-connected components.
DEFAULT_LESION_CONNECTIVITY = 3


# --------------------------------------------------------------------------------------------
# Input checks and the union box


def _as_mask(x: Any, name: str) -> np.ndarray:
    """Returns `x` as a 3D boolean array (non-zero = foreground) or raises naming `name`."""
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"metrics: {name} must be a 3D mask, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"metrics: {name} has unsupported dtype {arr.dtype}")
    return arr != 0


def _as_spacing(spacing: Sequence[float] | None) -> np.ndarray:
    """Returns the voxel spacing as a float64 (3,) array of positive finite values (default 1)."""
    if spacing is None:
        return np.ones(3, np.float64)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ValueError(f"metrics: spacing must be 3 positive finite numbers, got {spacing!r}")
    return sp


def _check_pair(
    pred: Any, truth: Any, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (pred, truth, spacing) validated: same-shape 3D boolean masks and a (3,) spacing."""
    a = _as_mask(pred, "pred")
    b = _as_mask(truth, "truth")
    if a.shape != b.shape:
        raise ValueError(f"metrics: pred shape {a.shape} differs from truth shape {b.shape}")
    return a, b, _as_spacing(spacing)


def _crop_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns both masks cropped to the bounding box of their union (empty arrays if none)."""
    box = union_box(bbox_of(a), bbox_of(b))
    if box is None:
        empty = np.zeros((0, 0, 0), bool)
        return empty, empty
    return a[box], b[box]


# --------------------------------------------------------------------------------------------
# Overlap and volume


def _ratio(num: float, den: float, both_empty: bool) -> float:
    """Returns num/den, 1.0 when both masks are empty, NaN when only the denominator is empty."""
    if both_empty:
        return 1.0
    if den == 0:
        return math.nan
    return num / den


def overlap_metrics_from_counts(n_pred: int, n_truth: int, n_inter: int) -> dict[str, float]:
    """Returns dice, iou, precision, recall, rvd from voxel counts |A|, |B|, |A ∩ B|."""
    both_empty = n_pred == 0 and n_truth == 0
    union = n_pred + n_truth - n_inter
    # Dice and IoU have a non-empty denominator unless both masks are empty.
    rvd = 0.0 if both_empty else ((n_pred - n_truth) / n_truth if n_truth else math.nan)
    return {
        "dice": _ratio(2.0 * n_inter, n_pred + n_truth, both_empty),
        "iou": _ratio(float(n_inter), union, both_empty),
        "precision": _ratio(float(n_inter), n_pred, both_empty),
        "recall": _ratio(float(n_inter), n_truth, both_empty),
        "rvd": rvd,
    }


def overlap_metrics(pred: Any, truth: Any) -> dict[str, float]:
    """Returns dice, iou, precision, recall, rvd (signed, (|A| - |B|) / |B|) of two 3D masks."""
    a, b, _ = _check_pair(pred, truth, None)
    a, b = _crop_union(a, b)
    return overlap_metrics_from_counts(
        int(np.count_nonzero(a)), int(np.count_nonzero(b)), int(np.count_nonzero(a & b))
    )


# --------------------------------------------------------------------------------------------
# Surface distances

_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Returns mask minus its 6-neighbourhood erosion (medpy's border; outside = background)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, iterations=1)


def surface_distances(
    pred: Any, truth: Any, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (d_pred, d_truth): mm distances from each surface voxel of A to B's surface and back.

    Both are float64 1D arrays in C order of the surface voxels, equal to medpy's
    `__surface_distances(A, B)` and `(B, A)`. Raises ValueError if either mask is empty.
    """
    a, b, sp = _check_pair(pred, truth, spacing)
    return _surface_distances_checked(a, b, sp)


def _surface_distances_checked(a: np.ndarray, b: np.ndarray, sp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the two directed surface-distance arrays for validated, non-empty masks."""
    a, b = _crop_union(a, b)
    if not a.any() or not b.any():
        raise ValueError("metrics: surface distances need non-empty pred and truth masks")
    # No padding needed: outside the union box both masks are background, which is exactly what
    # binary_erosion assumes beyond the array edge (border_value=0).
    surf_a = _surface(a)
    surf_b = _surface(b)
    # All surface voxels of both masks lie in the box, so each nearest partner is found inside it.
    d_to_b = ndimage.distance_transform_edt(~surf_b, sampling=sp)
    d_pred = d_to_b[surf_a]
    del d_to_b
    d_to_a = ndimage.distance_transform_edt(~surf_a, sampling=sp)
    d_truth = d_to_a[surf_b]
    return d_pred, d_truth


def surface_metrics_from_distances(d_pred: np.ndarray, d_truth: np.ndarray) -> dict[str, float]:
    """Returns asd (mean) and hd95 (95th percentile) of the union of both directed distances."""
    both = np.concatenate([d_pred, d_truth])
    return {"asd": float(both.mean()), "hd95": float(np.percentile(both, 95))}


def surface_metrics(pred: Any, truth: Any, spacing: Sequence[float] | None) -> dict[str, float]:
    """Returns asd and hd95 in mm; 0 when both masks are empty, NaN when exactly one is."""
    a, b, sp = _check_pair(pred, truth, spacing)
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return {"asd": 0.0, "hd95": 0.0}
    if not (has_a and has_b):
        return {"asd": math.nan, "hd95": math.nan}
    return surface_metrics_from_distances(*_surface_distances_checked(a, b, sp))


# --------------------------------------------------------------------------------------------
# Per case and aggregated


def binary_metrics(pred: Any, truth: Any, spacing: Sequence[float] | None) -> dict[str, float]:
    """Returns the per-case row: METRIC_NAMES (floats, NaN where undefined) plus voxel counts.

    pred, truth: 3D masks (X, Y, Z) or any axis order matching `spacing` (mm). Extra keys
    n_pred, n_truth, n_intersection (ints) let `global_dice_from_rows` and `summarize` compute
    the global Dice without the volumes.
    """
    a, b, sp = _check_pair(pred, truth, spacing)
    a, b = _crop_union(a, b)
    n_pred, n_truth = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    n_inter = int(np.count_nonzero(a & b))
    row: dict[str, float] = dict(overlap_metrics_from_counts(n_pred, n_truth, n_inter))
    if n_pred and n_truth:
        row.update(surface_metrics_from_distances(*_surface_distances_checked(a, b, sp)))
    elif not n_pred and not n_truth:
        row.update(asd=0.0, hd95=0.0)
    else:
        row.update(asd=math.nan, hd95=math.nan)
    row.update(n_pred=n_pred, n_truth=n_truth, n_intersection=n_inter)
    return row


def global_dice_from_rows(rows: Iterable[Mapping[str, Any]]) -> float:
    """Returns 2 Σ|A ∩ B| / Σ(|A| + |B|) over rows of `binary_metrics` (1.0 if all are empty)."""
    inter = total = 0
    for row in rows:
        inter += int(row["n_intersection"])
        total += int(row["n_pred"]) + int(row["n_truth"])
    return 1.0 if total == 0 else 2.0 * inter / total


def global_dice(pairs: Iterable[tuple[Any, Any]]) -> float:
    """Returns the Dice over all voxels of all (pred, truth) pairs (1.0 if every mask is empty)."""
    inter = total = 0
    for pred, truth in pairs:
        a, b, _ = _check_pair(pred, truth, None)
        inter += int(np.count_nonzero(a & b))
        total += int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * inter / total


def summarize(
    per_case_rows: Sequence[Mapping[str, Any]], keys: Sequence[str] = METRIC_NAMES
) -> dict[str, Any]:
    """Returns {key: {mean, std, n, n_undefined}} over cases, plus n_cases and global_dice.

    NaN values (undefined by the documented edge cases) are left out of mean and std and counted
    in n_undefined; std is the population std (ddof=0); a metric with no defined value has
    mean = std = NaN and n = 0. global_dice is present when every row has the voxel counts.
    """
    out: dict[str, Any] = {"n_cases": len(per_case_rows)}
    for key in keys:
        values = np.array([float(r[key]) for r in per_case_rows if key in r], np.float64)
        defined = values[~np.isnan(values)]
        out[key] = {
            "mean": float(defined.mean()) if defined.size else math.nan,
            "std": float(defined.std()) if defined.size else math.nan,
            "n": int(defined.size),
            "n_undefined": int(values.size - defined.size),
        }
    if per_case_rows and all("n_intersection" in r for r in per_case_rows):
        out["global_dice"] = global_dice_from_rows(per_case_rows)
    return out


# --------------------------------------------------------------------------------------------
# Lesions


def major_axis_length(coords_mm: np.ndarray) -> float:
    """Returns sqrt(20 λ_max) (mm) for voxel-centre coordinates (N, 3): an ellipsoid's full length.

    λ_max is the largest eigenvalue of the coordinates' covariance (ddof=0). For a solid
    ellipsoid with semi-axes a >= b >= c the variance along a is a²/5, so this is 2a; it equals
    scikit-image's `regionprops(...).axis_major_length` (with spacing) in 3D. One voxel gives 0.
    """
    if coords_mm.shape[0] < 2:
        return 0.0
    cov = np.cov(coords_mm, rowvar=False, ddof=0)
    lam = float(np.linalg.eigvalsh(cov)[-1])
    return math.sqrt(20.0 * max(lam, 0.0))


def _component_extents(labels: np.ndarray, n: int, spacing: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Returns voxel counts (n,) and major-axis lengths (mm) of components 1..n of `labels`."""
    if n == 0:  # find_objects treats max_label=0 as "unset" and fails on empty arrays
        return np.zeros(0, np.int64), []
    boxes = ndimage.find_objects(labels, max_label=n)
    counts = component_sizes(labels, boxes, n)[1:]
    axes: list[float] = []
    for i, box in enumerate(boxes, start=1):
        idx = np.nonzero(labels[box] == i)
        offset = np.array([s.start for s in box], np.float64)
        coords = (np.stack(idx, axis=1).astype(np.float64) + offset) * spacing
        axes.append(major_axis_length(coords))
    return counts, axes


def lesion_detection(
    pred: Any,
    truth: Any,
    spacing: Sequence[float] | None,
    connectivity: int = DEFAULT_LESION_CONNECTIVITY,
    min_overlap: float = 0.0,
) -> dict[str, Any]:
    """Returns lesion-wise detection counts and per-lesion lists for 3D tumour masks.

    True lesions are connected components of `truth` (26-neighbourhood by default; `connectivity`
    as in `scipy.ndimage.generate_binary_structure`). A true lesion is hit when the prediction
    covers at least one of its voxels and at least `min_overlap` of them (a fraction); otherwise
    it is missed. A predicted component touching no truth voxel is a false positive.

    Keys: n_true, n_hit, n_missed, n_pred, n_false_positive (ints); true_lesions: list of
    {label, voxels, volume_mm3, major_axis_mm, overlap_fraction, hit}; pred_components: list of
    {label, voxels, volume_mm3, false_positive}. Labels number components inside the bounding box
    of pred ∪ truth in scipy's scan order.
    """
    a, b, sp = _check_pair(pred, truth, spacing)
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"metrics: min_overlap must be in [0, 1], got {min_overlap!r}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"metrics: connectivity must be 1, 2 or 3, got {connectivity!r}")
    a, b = _crop_union(a, b)
    voxel_mm3 = float(np.prod(sp))
    true_labels, n_true = label_components(b, connectivity)
    pred_labels, n_pred = label_components(a, connectivity)

    true_counts, true_axes = _component_extents(true_labels, n_true, sp)
    covered = np.bincount(true_labels[a], minlength=n_true + 1)[1:]
    true_lesions = []
    for i in range(n_true):
        fraction = float(covered[i]) / float(true_counts[i])
        true_lesions.append(
            {
                "label": i + 1,
                "voxels": int(true_counts[i]),
                "volume_mm3": float(true_counts[i]) * voxel_mm3,
                "major_axis_mm": true_axes[i],
                "overlap_fraction": fraction,
                "hit": bool(covered[i] > 0 and fraction >= min_overlap),
            }
        )
    pred_counts = component_sizes(pred_labels, None, n_pred)[1:]
    touching = np.bincount(pred_labels[b], minlength=n_pred + 1)[1:]
    pred_components = [
        {
            "label": j + 1,
            "voxels": int(pred_counts[j]),
            "volume_mm3": float(pred_counts[j]) * voxel_mm3,
            "false_positive": bool(touching[j] == 0),
        }
        for j in range(n_pred)
    ]
    n_hit = sum(les["hit"] for les in true_lesions)
    return {
        "n_true": int(n_true),
        "n_hit": int(n_hit),
        "n_missed": int(n_true - n_hit),
        "n_pred": int(n_pred),
        "n_false_positive": int(sum(c["false_positive"] for c in pred_components)),
        "true_lesions": true_lesions,
        "pred_components": pred_components,
    }


# --------------------------------------------------------------------------------------------
# Tumour-size study (paper, Table 6)


def tumor_size_row(
    case_id: str,
    pred: Any,
    truth: Any,
    spacing: Sequence[float] | None,
    connectivity: int = DEFAULT_LESION_CONNECTIVITY,
) -> dict[str, Any]:
    """Returns {case_id, tumor_dice, n_tumors, mean_major_axis_mm} for one case's tumour masks.

    mean_major_axis_mm is the mean over the case's true tumours (connected components of truth)
    of `major_axis_length`; NaN when the case has no true tumour.
    """
    a, b, sp = _check_pair(pred, truth, spacing)
    a, b = _crop_union(a, b)
    labels, n = label_components(b, connectivity)
    _, axes = _component_extents(labels, n, sp)
    counts = overlap_metrics_from_counts(
        int(np.count_nonzero(a)), int(np.count_nonzero(b)), int(np.count_nonzero(a & b))
    )
    return {
        "case_id": str(case_id),
        "tumor_dice": counts["dice"],
        "n_tumors": int(n),
        "mean_major_axis_mm": float(np.mean(axes)) if n else math.nan,
    }


def tumor_size_groups(rows: Sequence[Mapping[str, Any]], threshold: float = 0.6) -> dict[str, Any]:
    """Returns the Table-6 grouping of `tumor_size_row` rows by tumour Dice (>= vs < threshold).

    Keys: threshold; groups: {"dice>=T": g, "dice<T": g} with g = {n_cases, n_tumors,
    mean_major_axis_mm, std_major_axis_mm} (mean/std over cases of the per-case mean, ddof=0;
    NaN for an empty group); n_cases_without_tumor (left out of both groups); rows.
    """
    with_tumor = [r for r in rows if r["n_tumors"] > 0]
    groups = {}
    for name, keep in (
        (f"dice>={threshold:g}", lambda d: d >= threshold),
        (f"dice<{threshold:g}", lambda d: d < threshold),
    ):
        sel = [r for r in with_tumor if keep(r["tumor_dice"])]
        sizes = np.array([r["mean_major_axis_mm"] for r in sel], np.float64)
        groups[name] = {
            "n_cases": len(sel),
            "n_tumors": int(sum(r["n_tumors"] for r in sel)),
            "mean_major_axis_mm": float(sizes.mean()) if sel else math.nan,
            "std_major_axis_mm": float(sizes.std()) if sel else math.nan,
        }
    return {
        "threshold": float(threshold),
        "groups": groups,
        "n_cases_without_tumor": len(rows) - len(with_tumor),
        "rows": [dict(r) for r in rows],
    }


def tumor_size_study(
    cases: Iterable[tuple[str, Any, Any, Sequence[float]]],
    threshold: float = 0.6,
    connectivity: int = DEFAULT_LESION_CONNECTIVITY,
) -> dict[str, Any]:
    """Returns `tumor_size_groups` of the (case_id, pred, truth, spacing) cases (may be lazy)."""
    rows = [
        tumor_size_row(case_id, pred, truth, spacing, connectivity=connectivity)
        for case_id, pred, truth, spacing in cases
    ]
    return tumor_size_groups(rows, threshold=threshold)
