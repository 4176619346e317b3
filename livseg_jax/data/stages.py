"""The two stages' rules, shared by training (grain pipeline) and inference (two-stage prediction).

Stage "liver" sees the whole preprocessed volume; its foreground is the liver (labels 1 and 2).
Stage "tumor" sees the volume cropped to the liver's bounding box grown by a margin in mm; its
foreground is the tumour (label 2). Training crops around the reference liver (or a stage-1
prediction), inference around the stage-1 liver, with the same margin rule, so both see the same
kind of crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from livseg_jax.data.regions import Bbox, bbox_of

STAGES = ("liver", "tumor")


def stage_target(label: np.ndarray, stage: str) -> np.ndarray:
    """Returns the stage's binary target (uint8): liver (1 or 2) for "liver", tumour (2) for "tumor"."""
    if stage == "liver":
        return (label >= 1).astype(np.uint8)
    if stage == "tumor":
        return (label == 2).astype(np.uint8)
    raise ValueError(f"stage must be 'liver' or 'tumor', got {stage!r}")


def liver_crop_margin(spacing: Sequence[float], margin_mm: float) -> tuple[int, int, int]:
    """Returns the per-axis crop margin in voxels for a margin in mm (rounded up)."""
    return tuple(int(math.ceil(margin_mm / float(s))) for s in spacing)


def liver_crop_box(liver: np.ndarray, spacing: Sequence[float], margin_mm: float) -> Bbox | None:
    """Returns the tumour stage's crop: the liver mask's box grown by `margin_mm`, or None if empty."""
    return bbox_of(liver, liver_crop_margin(spacing, margin_mm))
