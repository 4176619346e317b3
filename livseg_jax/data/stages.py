"""The stages' rules, shared by training (grain pipeline) and inference (prediction).

Stage "liver" sees the whole preprocessed volume; its foreground is the liver (labels 1 and 2).
Stage "tumor" sees the volume cropped to the liver's bounding box grown by a margin in mm; its
foreground is the tumour (label 2). Training crops around the reference liver (or a stage-1
prediction), inference around the stage-1 liver, with the same margin rule, so both see the same
kind of crop.
Stage "joint" is the one-stage model (the LiTS thesis's 3-class baseline): the whole volume, like
"liver", and the label map itself (0 background, 1 liver, 2 tumour) as a 3-class target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from livseg_jax.data.regions import Bbox, bbox_of

STAGES = ("liver", "tumor", "joint")
# Softmax classes each stage's network predicts: background + its foreground(s).
STAGE_CLASSES = {"liver": 2, "tumor": 2, "joint": 3}


def check_stage(stage: str, num_classes: int) -> None:
    """Raises ValueError unless `stage` is one of STAGES and `num_classes` is the number it predicts."""
    if stage not in STAGE_CLASSES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if int(num_classes) != STAGE_CLASSES[stage]:
        raise ValueError(f"stage {stage!r} predicts {STAGE_CLASSES[stage]} classes but model.num_classes = "
                         f"{num_classes}; set model.num_classes = {STAGE_CLASSES[stage]}")


def stage_target(label: np.ndarray, stage: str) -> np.ndarray:
    """Returns the stage's target (uint8): liver (1 or 2) for "liver", tumour (2) for "tumor", and
    the label map itself (0/1/2) for "joint"."""
    if stage == "liver":
        return (label >= 1).astype(np.uint8)
    if stage == "tumor":
        return (label == 2).astype(np.uint8)
    if stage == "joint":
        return np.asarray(label, np.uint8)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def liver_crop_margin(spacing: Sequence[float], margin_mm: float) -> tuple[int, int, int]:
    """Returns the per-axis crop margin in voxels for a margin in mm (rounded up)."""
    return tuple(int(math.ceil(margin_mm / float(s))) for s in spacing)


def liver_crop_box(liver: np.ndarray, spacing: Sequence[float], margin_mm: float) -> Bbox | None:
    """Returns the tumour stage's crop: the liver mask's box grown by `margin_mm`, or None if empty."""
    return bbox_of(liver, liver_crop_margin(spacing, margin_mm))
