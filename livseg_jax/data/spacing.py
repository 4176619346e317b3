"""The "median" target spacing: nnU-Net's rule over the training cases, read from NIfTI headers.

nnU-Net (MIC-DKFZ/nnUNet, nnunetv2/experiment_planning/experiment_planners/
default_experiment_planner.py, `ExperimentPlanner.determine_fullres_target_spacing`) takes the
per-axis median of the training cases' spacings. When the data are anisotropic, i.e. the coarsest
axis of that median is more than `ANISOTROPY_THRESHOLD` (3) times the next coarsest and the median
case has fewer than 1/3 as many voxels along it as along the other axes, the coarse axis gets the
10th percentile of the cases' spacings on it instead (finer slices: thick-slice outliers would
otherwise set the grid), but never finer than the other axes' spacing (+1e-5 mm, so it stays the
coarsest axis). nnU-Net uses the shapes after its non-zero crop; here the image's full shape is
used (reading headers only, no voxels).

Training (`training/loop.py`) calls `resolve_median_spacing` with its training images before the
cache is built and stores the result as `preprocess.target_spacing` in the run's config.json, so
the run's prediction uses exactly the grid it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from livseg_jax.data.nifti import DataError, PathLike, check_spatial_shape, geometry_of

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD (nnunetv2/configuration.py)
COARSE_AXIS_PERCENTILE = 10.0


def median_target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
                          anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> tuple[float, float, float]:
    """Returns nnU-Net's target spacing (sz, sy, sx) mm for cases of these spacings and (D, H, W) shapes."""
    spacings = np.asarray(spacings, dtype=np.float64)
    shapes = np.asarray(shapes, dtype=np.float64)
    if spacings.ndim != 2 or spacings.shape[1] != 3 or len(spacings) == 0 or shapes.shape != spacings.shape:
        raise ValueError(f"need one (sz, sy, sx) spacing and one (D, H, W) shape per case, got arrays of shape "
                         f"{spacings.shape} and {shapes.shape}")
    if not np.all(np.isfinite(spacings) & (spacings > 0)):
        raise ValueError(f"spacings must be positive and finite, got {spacings.tolist()}")
    target = np.percentile(spacings, 50, axis=0)
    size = np.percentile(shapes, 50, axis=0)
    coarse = int(np.argmax(target))
    others = [i for i in range(3) if i != coarse]
    finest_other = max(target[i] for i in others)
    anisotropic_spacing = target[coarse] > anisotropy_threshold * finest_other
    anisotropic_voxels = size[coarse] * anisotropy_threshold < min(size[i] for i in others)
    if anisotropic_spacing and anisotropic_voxels:
        coarse_spacing = np.percentile(spacings[:, coarse], COARSE_AXIS_PERCENTILE)
        if coarse_spacing < finest_other:
            coarse_spacing = max(finest_other, coarse_spacing) + 1e-5
        target[coarse] = coarse_spacing
    return tuple(float(t) for t in target)


def header_grid(path: PathLike) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """Returns (spacing (sz, sy, sx) mm, shape (D, H, W)) of a NIfTI image from its header (voxels unread)."""
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises many types for bad bytes
        raise DataError(f"{path}: cannot read as NIfTI (corrupt or not an image file): {e}") from e
    check_spatial_shape(tuple(img.shape), path)
    geometry = geometry_of(img, path)
    return tuple(float(s) for s in geometry.spacing), geometry.shape_dhw


def resolve_median_spacing(section: Mapping[str, Any], image_paths: Sequence[PathLike]) -> tuple[float, float, float]:
    """Returns the "median" target spacing of these training images for a `preprocess` section.

    A section that already holds another non-zero `target_spacing` raises ValueError: a run's
    spacing is computed from its own training cases, never silently replaced.
    """
    if not image_paths:
        raise ValueError("preprocess.spacing_mode 'median' needs at least one training case")
    grids = [header_grid(p) for p in image_paths]
    computed = median_target_spacing([g[0] for g in grids], [g[1] for g in grids])
    given = tuple(float(t) for t in section.get("target_spacing", (0.0, 0.0, 0.0)))
    if any(given) and not np.allclose(given, computed, rtol=1e-6, atol=0.0):
        raise ValueError(f"preprocess.spacing_mode 'median': preprocess.target_spacing {given} differs from "
                         f"{computed}, the median rule over the {len(grids)} training cases; leave it (0, 0, 0) "
                         "for training to compute it, or use spacing_mode 'target' to fix a spacing")
    return computed
