"""Regions of (D, H, W) masks: bounding boxes, crops and pastes, connected components.

Shared by preprocessing (body crop), the stage rules (liver crop), inference (largest liver
component, pasting the tumour crop back) and the metrics (union box, lesion components).
Connectivity is scipy's: 1 faces, 2 faces and edges, 3 faces, edges and corners
(`scipy.ndimage.generate_binary_structure`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

Bbox = tuple[slice, slice, slice]
# Above this many components one bincount over the whole label map is cheaper than counting
# inside each component's box.
_MAX_BOXED_COMPONENTS = 64


def bbox_of(mask: np.ndarray, margin_vox: float | Sequence[float] = 0) -> Bbox | None:
    """Returns the bounding box of a 3D mask grown by `margin_vox` per axis (clipped), or None if empty.

    Margins are rounded up to whole voxels.
    """
    # Two reductions over the volume instead of one per axis: the (D, H) projection, then W
    # inside the box found so far.
    any_dh = mask.any(axis=2)
    d = np.flatnonzero(any_dh.any(axis=1))
    if d.size == 0:
        return None
    h = np.flatnonzero(any_dh.any(axis=0))
    w = np.flatnonzero(mask[d[0] : d[-1] + 1, h[0] : h[-1] + 1].any(axis=(0, 1)))
    margin = np.broadcast_to(np.ceil(np.asarray(margin_vox, dtype=np.float64)), (3,))
    return tuple(
        slice(max(0, int(hits[0] - m)), min(n, int(hits[-1] + 1 + m)))
        for hits, m, n in zip((d, h, w), margin, mask.shape, strict=True)
    )


def union_box(box_a: Bbox | None, box_b: Bbox | None) -> Bbox | None:
    """Returns the smallest box holding both boxes (None when both are None)."""
    if box_a is None:
        return box_b
    if box_b is None:
        return box_a
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box_a, box_b, strict=True))


def crop_to_bbox(array: np.ndarray, bbox: Bbox) -> np.ndarray:
    """Returns `array[bbox]` for an array whose leading axes are (D, H, W) (a view)."""
    return array[tuple(bbox)]


def paste_into(cropped: np.ndarray, bbox: Bbox, shape: Sequence[int], fill: Any = 0) -> np.ndarray:
    """Returns an array of `shape` (leading (D, H, W)) filled with `fill`, `cropped` put at `bbox`."""
    out = np.full(tuple(shape) + cropped.shape[3:], fill, dtype=cropped.dtype)
    out[tuple(bbox)] = cropped
    return out


def label_components(mask: np.ndarray, connectivity: int = 1) -> tuple[np.ndarray, int]:
    """Returns (label map numbering the connected components 1..n in scan order, n)."""
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, connectivity))


def component_sizes(labels: np.ndarray, boxes: Sequence[Bbox | None] | None, n: int) -> np.ndarray:
    """Returns the voxel counts (n + 1,) of components 1..n of a label map (index 0 set to 0).

    `boxes` is `ndimage.find_objects(labels)`, or None to have it found only when it is used.
    """
    if n == 0:  # find_objects treats max_label=0 as "unset" and fails on empty arrays
        return np.zeros(1, np.int64)
    if n > _MAX_BOXED_COMPONENTS:  # many components: one pass over the volume
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        return sizes
    # Few components (the usual body or liver mask): count inside each bounding box, which avoids
    # bincount's conversion of the whole label map to int64 (~5x slower on a CT).
    if boxes is None:
        boxes = ndimage.find_objects(labels, max_label=n)
    sizes = np.zeros(n + 1, np.int64)
    for i, box in enumerate(boxes, start=1):
        if box is not None:
            sizes[i] = np.count_nonzero(labels[box] == i)
    return sizes


def largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Returns the largest connected component of a (D, H, W) mask as bool (empty stays empty)."""
    labels, n = label_components(mask, connectivity)
    if n <= 1:
        return labels > 0
    # Boxes only when few components: a noisy mask has 10^5 of them, and find_objects over those
    # costs more than the labelling.
    return labels == int(np.argmax(component_sizes(labels, None, n)))


def largest_component_box(mask: np.ndarray, with_mask: bool = True) -> tuple[np.ndarray | None, Bbox | None]:
    """Returns (the largest face-connected component as bool, or None without `with_mask`; its box).

    The box is None for an empty mask (whose mask is then all False).
    """
    labels, n = label_components(mask)
    if n == 0:
        return (labels.astype(bool) if with_mask else None), None
    boxes = ndimage.find_objects(labels)
    k = int(np.argmax(component_sizes(labels, boxes, n)))
    return (labels == k if with_mask else None), boxes[k - 1]
