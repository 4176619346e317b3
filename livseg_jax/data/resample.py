"""Resampling (D, H, W) volumes onto a grid of another shape over the same field of view.

Grids are aligned by voxel edges, as `scipy.ndimage.zoom(..., grid_mode=True)` and nnU-Net's
resizing do: output voxel o of an axis with n input and m output voxels samples input coordinate
x = (o + 0.5) * n / m - 0.5, so the first and last voxel edges coincide and the spacing becomes
s * n / m. Values beyond the border repeat the edge voxel (`mode="nearest"`). The interpolation is
scipy's (`ndimage.affine_transform` with a diagonal matrix, i.e. its zoom-and-shift kernel).

- Images: `linear` (order 1) or `cubic` (order 3 B-spline, prefiltered) interpolation, float32.
- Labels: `nearest`: output voxel o takes input voxel floor((o + 0.5) n / m), the one whose extent
  holds its centre (a centre on an edge takes the upper voxel), computed in integers so that no
  rounding decides; or `linear_onehot`: each label's indicator is interpolated linearly and the
  voxel takes the label of the largest value (nnU-Net's way of resampling segmentations); ties
  (within 1e-5) go to the higher label, so tumour wins over liver and liver over background. Only
  the box around the foreground is interpolated: outside it every indicator but the background's
  is zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from livseg_jax.data.regions import bbox_of

IMAGE_ORDERS = {"linear": 1, "cubic": 3}  # image_interpolation -> spline order
LABEL_METHODS = ("nearest", "linear_onehot")  # label_interpolation


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    """Returns the grid shape at `target` spacing: round(n * s / t) per axis, at least 1; t = 0 keeps n.

    The rule of nnU-Net's `compute_new_shape`; the spacing reached is s * n / round(n * s / t).
    """
    return tuple(
        int(n) if t == 0 else max(1, int(round(n * float(s) / float(t))))
        for n, s, t in zip(shape, spacing, target, strict=True)
    )


def _zoom_shift(array: np.ndarray, shape: Sequence[int], order: int, out_start: Sequence[int],
                in_start: Sequence[int], full_in: Sequence[int], full_out: Sequence[int]) -> np.ndarray:
    """Returns the part `out_start + [0, shape)` of the full-grid resampling, given the input part at `in_start`."""
    scale = np.array([n / m for n, m in zip(full_in, full_out, strict=True)])
    offset = (np.asarray(out_start) + 0.5) * scale - 0.5 - np.asarray(in_start)
    return ndimage.affine_transform(array, scale, offset=offset, output_shape=tuple(int(s) for s in shape),
                                    order=order, mode="nearest", prefilter=order > 1, output=np.float32)


def resample_image(image: np.ndarray, shape: Sequence[int], interpolation: str = "linear") -> np.ndarray:
    """Returns `image` resampled to `shape` (same field of view), float32, by linear or cubic interpolation."""
    if interpolation not in IMAGE_ORDERS:
        raise ValueError(f"image interpolation must be one of {tuple(IMAGE_ORDERS)}, got {interpolation!r}")
    image = np.asarray(image).astype(np.float32, copy=False)
    shape = tuple(int(s) for s in shape)
    if shape == image.shape:
        return image.copy()
    return _zoom_shift(image, shape, IMAGE_ORDERS[interpolation], (0,) * 3, (0,) * 3, image.shape, shape)


def _covering_boxes(box, full_in: Sequence[int], full_out: Sequence[int]):
    """Returns (output box, input box): every output voxel whose samples touch `box`, and all their samples.

    Output voxel o interpolates linearly between input voxels floor(x) and floor(x) + 1, where
    x = (o + 0.5) r - 0.5 and r = n / m. The boxes carry a voxel of slack each side; the input box
    holds every sample of the output box, so no border clamping happens inside it except at the
    volume's own edges, where the full computation clamps the same way.
    """
    out_box, in_box = [], []
    for b, n, m in zip(box, full_in, full_out, strict=True):
        r = n / m
        o0 = max(0, math.floor((b.start - 0.5) / r - 0.5) - 1)
        o1 = min(m, math.ceil((b.stop + 0.5) / r - 0.5) + 2)
        i0 = max(0, math.floor((o0 + 0.5) * r - 0.5) - 1)
        i1 = min(n, math.floor((o1 - 0.5) * r - 0.5) + 3)
        out_box.append(slice(o0, o1))
        in_box.append(slice(i0, i1))
    return tuple(out_box), tuple(in_box)


def nearest_indices(n: int, m: int) -> np.ndarray:
    """Returns, for each of m output voxels, the input voxel (of n) whose extent holds its centre."""
    return (2 * np.arange(m, dtype=np.int64) + 1) * n // (2 * m)


TIE_MARGIN = 1e-5  # linear_onehot: a higher label wins unless a lower one scores more than this above it


def resample_labels(labels: np.ndarray, shape: Sequence[int], method: str = "nearest") -> np.ndarray:
    """Returns `labels` resampled to `shape` (same field of view), uint8, by nearest or one-hot linear."""
    if method not in LABEL_METHODS:
        raise ValueError(f"label interpolation must be one of {LABEL_METHODS}, got {method!r}")
    labels = np.asarray(labels)
    shape = tuple(int(s) for s in shape)
    if shape == labels.shape:
        return labels.astype(np.uint8, copy=True)
    if method == "nearest":  # separable: one gather per axis
        out = labels.astype(np.uint8, copy=False)
        for axis, (n, m) in enumerate(zip(labels.shape, shape, strict=True)):
            if n != m:
                out = np.take(out, nearest_indices(n, m), axis=axis)
        return np.ascontiguousarray(out)
    out = np.zeros(shape, np.uint8)
    box = bbox_of(labels > 0)
    if box is None:
        return out
    out_box, in_box = _covering_boxes(box, labels.shape, shape)
    part = labels[in_box]
    out_start = [s.start for s in out_box]
    in_start = [s.start for s in in_box]
    out_shape = [s.stop - s.start for s in out_box]
    num = int(part.max())
    # Linear weights sum to one, so the background's indicator is 1 minus the others'.
    scores = np.empty((num + 1, *out_shape), np.float32)
    for cls in range(1, num + 1):
        scores[cls] = _zoom_shift((part == cls).astype(np.float32), out_shape, 1, out_start, in_start,
                                  labels.shape, shape)
    scores[0] = 1.0 - scores[1:].sum(axis=0)
    scores += (TIE_MARGIN * np.arange(num + 1, dtype=np.float32)).reshape(-1, 1, 1, 1)
    out[out_box] = np.argmax(scores, axis=0)
    return out
