"""Tumour post-processing: probability threshold, minimum lesion volume, and their choice on validation cases.

Prediction (`two_stage.predict_case` / `predict_joint_case`) keeps the liver's largest connected
component (`data.regions.largest_component`) and the tumour inside it. A run may also store
`postprocess.json` (`write_settings`), which prediction then applies to the tumour:
1. `tumor_threshold`: tumour where its blended probability exceeds the threshold, instead of the
   argmax (None keeps the argmax; 0.5 equals it for a 2-class tumour stage, up to ties);
2. `tumor_min_volume_mm3`: tumour components (`lesion_connectivity`, 26-neighbourhood by default,
   as `metrics.lesion_detection` counts lesions) smaller than this many mm^3 are removed; the voxel
   volume is the product of the spacing of the grid the mask lies on.

`choose_settings` grid-searches both on validation cases (probability maps with their truth) and
keeps the best of the objective: mean tumour Dice over the cases minus `fp_penalty` times the mean
number of false-positive lesions per case (docs/inference.md, "Post-processing").
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from livseg_jax import atomic_write
from livseg_jax.data.regions import component_sizes, label_components
from livseg_jax.metrics import DEFAULT_LESION_CONNECTIVITY, overlap_metrics_from_counts

POSTPROCESS_FILE = "postprocess.json"
DEFAULT_THRESHOLDS = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_MIN_VOLUMES_MM3 = (0.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
DEFAULT_FP_PENALTY = 0.01


@dataclasses.dataclass(frozen=True)
class PostprocessSettings:
    """The tumour post-processing applied after the networks (the identity with the defaults)."""

    tumor_threshold: float | None = None  # None: argmax; else tumour where p(tumour) > threshold
    tumor_min_volume_mm3: float = 0.0  # tumour components smaller than this are removed
    lesion_connectivity: int = DEFAULT_LESION_CONNECTIVITY  # 1, 2 or 3 (scipy's)

    def __post_init__(self) -> None:
        t = self.tumor_threshold
        if t is not None and not (isinstance(t, int | float) and 0.0 <= float(t) < 1.0):
            raise ValueError(f"postprocess tumor_threshold must be None or in [0, 1), got {t!r}")
        v = self.tumor_min_volume_mm3
        if not (isinstance(v, int | float) and np.isfinite(v) and v >= 0):
            raise ValueError(f"postprocess tumor_min_volume_mm3 must be a finite number >= 0, got {v!r}")
        if self.lesion_connectivity not in (1, 2, 3):
            raise ValueError(f"postprocess lesion_connectivity must be 1, 2 or 3, got {self.lesion_connectivity!r}")

    @property
    def is_identity(self) -> bool:
        """Returns whether these settings change nothing (argmax, no minimum volume)."""
        return self.tumor_threshold is None and self.tumor_min_volume_mm3 == 0

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "postprocess settings") -> PostprocessSettings:
        """Returns settings from a dict; unknown keys or bad values raise ValueError naming `where`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected {sorted(names)}")
        try:
            return cls(**dict(values))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


def voxel_volume_mm3(spacing: Sequence[float]) -> float:
    """Returns the volume of one voxel in mm^3 (the product of a (3,) spacing of positive numbers)."""
    sp = np.asarray(spacing, np.float64).reshape(-1)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ValueError(f"spacing must be 3 positive finite numbers (mm), got {spacing!r}")
    return float(np.prod(sp))


def component_volumes(mask: np.ndarray, spacing: Sequence[float], connectivity: int = DEFAULT_LESION_CONNECTIVITY
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (component label map, volumes in mm^3 (n + 1,) indexed by label, index 0 = 0)."""
    labels, n = label_components(np.asarray(mask, bool), connectivity)
    return labels, component_sizes(labels, None, n) * voxel_volume_mm3(spacing)


def remove_small_components(mask: np.ndarray, spacing: Sequence[float], min_volume_mm3: float,
                            connectivity: int = DEFAULT_LESION_CONNECTIVITY) -> np.ndarray:
    """Returns the bool mask without its components smaller than `min_volume_mm3` (voxel volume from spacing)."""
    mask = np.asarray(mask, bool)
    if min_volume_mm3 <= 0:
        return mask.copy()
    labels, volumes = component_volumes(mask, spacing, connectivity)
    return (volumes >= min_volume_mm3)[labels] & mask


def tumor_probability(probs: np.ndarray) -> np.ndarray:
    """Returns the tumour probability (D, H, W) of (D, H, W, K) probabilities: the last class's."""
    if probs.ndim != 4 or probs.shape[-1] not in (2, 3):
        raise ValueError(f"expected (D, H, W, K) probabilities with K = 2 (tumour stage) or 3 (joint), "
                         f"got shape {probs.shape}")
    return probs[..., -1]


def threshold_tumor(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Returns the tumour mask of (D, H, W, K) probabilities: p(tumour) > threshold, or the argmax for None."""
    p = tumor_probability(probs)
    if threshold is None:
        return np.argmax(probs, axis=-1) == probs.shape[-1] - 1
    return p > threshold


def postprocess_tumor(tumor: np.ndarray, spacing: Sequence[float], settings: PostprocessSettings) -> np.ndarray:
    """Returns the tumour mask with the settings' minimum volume applied (thresholding happens before)."""
    return remove_small_components(tumor, spacing, settings.tumor_min_volume_mm3, settings.lesion_connectivity)


# ------------------------------------------------------------------------ choice on validation


@dataclasses.dataclass
class ValidationCase:
    """One validation case for the choice: tumour probabilities and truth on one grid, its spacing."""

    case_id: str
    probs: np.ndarray  # (D, H, W, K) probabilities (0 outside the region the model saw)
    truth: np.ndarray  # (D, H, W) bool tumour
    spacing: tuple[float, float, float]
    region: np.ndarray | None = None  # (D, H, W) bool: tumour allowed only here (the liver); None: anywhere


def _case_scores(case: ValidationCase, threshold: float | None, min_volumes: Sequence[float],
                 connectivity: int) -> list[tuple[float, int]]:
    """Returns [(Dice, false-positive lesions)] of one case for each minimum volume, at one threshold."""
    mask = threshold_tumor(case.probs, threshold)
    if case.region is not None:
        mask &= case.region
    labels, n = label_components(mask, connectivity)
    voxels = component_sizes(labels, None, n)
    volumes = voxels * voxel_volume_mm3(case.spacing)
    n_truth = int(np.count_nonzero(case.truth))
    # Per component: voxels inside the truth, so Dice and false positives follow for every minimum
    # volume from one labelling.
    inter = np.bincount(labels[case.truth], minlength=n + 1)
    out = []
    for vmin in min_volumes:
        keep = volumes >= vmin
        keep[0] = False
        dice = overlap_metrics_from_counts(int(voxels[keep].sum()), n_truth, int(inter[keep].sum()))["dice"]
        out.append((float(dice), int(np.count_nonzero(keep & (inter == 0)))))
    return out


def choose_settings(cases: Sequence[ValidationCase], thresholds: Iterable[float | None] = DEFAULT_THRESHOLDS,
                    min_volumes_mm3: Iterable[float] = DEFAULT_MIN_VOLUMES_MM3,
                    fp_penalty: float = DEFAULT_FP_PENALTY,
                    connectivity: int = DEFAULT_LESION_CONNECTIVITY) -> tuple[PostprocessSettings, list[dict]]:
    """Returns (the best settings, one row per grid point) by mean Dice - fp_penalty * mean FP lesions.

    Ties keep the earlier grid point: the grids are searched in the order given (argmax first,
    smallest volume first), so equal scores keep the gentler post-processing.
    """
    if not cases:
        raise ValueError("choosing post-processing needs at least one validation case")
    if fp_penalty < 0:
        raise ValueError(f"fp_penalty must be >= 0, got {fp_penalty}")
    thresholds, min_volumes = list(thresholds), [float(v) for v in min_volumes_mm3]
    if not thresholds or not min_volumes:
        raise ValueError("the threshold and minimum-volume grids must not be empty")
    rows, best, best_score = [], None, -np.inf
    for t in thresholds:
        per_case = [_case_scores(c, t, min_volumes, connectivity) for c in cases]
        for j, vmin in enumerate(min_volumes):
            dice = float(np.mean([scores[j][0] for scores in per_case]))
            fps = float(np.mean([scores[j][1] for scores in per_case]))
            score = dice - fp_penalty * fps
            rows.append({"tumor_threshold": t, "tumor_min_volume_mm3": vmin, "dice": dice,
                         "false_positive_lesions": fps, "objective": score})
            if score > best_score:
                best_score = score
                best = PostprocessSettings(t, vmin, connectivity)
    return best, rows


# ------------------------------------------------------------------------------ the run's file


def settings_path(run_dir: str | os.PathLike) -> pathlib.Path:
    """Returns where a run directory keeps its chosen post-processing."""
    return pathlib.Path(run_dir) / POSTPROCESS_FILE


def write_settings(run_dir: str | os.PathLike, settings: PostprocessSettings,
                   record: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Returns the path of `postprocess.json` after writing the settings (and how they were chosen) atomically."""
    return atomic_write.write_json(settings_path(run_dir), {"settings": settings.to_dict(), **(record or {})})


def read_settings(run_dir: str | os.PathLike) -> PostprocessSettings | None:
    """Returns the run's stored post-processing, or None when it has no `postprocess.json`."""
    path = settings_path(run_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise ValueError(f"{path}: expected an object with a 'settings' object")
    return PostprocessSettings.from_dict(data["settings"], str(path))
