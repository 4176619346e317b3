"""The bounding box of a mask's largest face-connected component, labelled slab by slab on all cores.

`regions.largest_component_box` labels the whole volume with `scipy.ndimage.label` and finds the
components' boxes with `find_objects`: one core, about 0.25 s for the body mask of a 512x512x400
CT (searched on a 400x256x256 grid), the largest host cost of preprocessing. Both scipy functions
release the GIL, so here each slab of slices is labelled, boxed and counted on the shared slab
pool (`slabs.parallel_slabs`); then the components touching across each slab boundary (the same
row and column in the last slice of one slab and the first of the next) are joined
(`scipy.sparse.csgraph.connected_components` on those pairs), and their sizes summed and boxes
united.

Equal to `regions.largest_component_box(mask, with_mask=False)[1]`, ties included: scipy numbers
components in scan (C) order of their first voxel, and `argmax` keeps the first of equal sizes.
Slabs follow each other in scan order and each slab numbers its parts in scan order, so numbering
the parts slab after slab orders the joined components by their first voxel too: among equal sizes
the one whose first part has the smallest number is kept (tests/test_slab_components.py).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from livseg_jax.data.regions import Bbox, component_sizes
from livseg_jax.data.slabs import parallel_slabs, slab_threads


def largest_component_box(mask: np.ndarray, threads: int | None = None) -> Bbox | None:
    """Returns the box of the largest face-connected component of a (D, H, W) mask (None when empty),
    labelled over slabs of slices on `threads` threads (default `slab_threads()`)."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 3:
        raise ValueError(f"expected a (D, H, W) mask, got shape {mask.shape}")
    threads = slab_threads() if threads is None else threads
    parts: dict[int, tuple] = {}  # slab start -> (stop, n, sizes, box starts, box stops, first, last slice)

    def label_slab(start: int, stop: int) -> None:
        labels, n = ndimage.label(mask[start:stop])
        boxes = ndimage.find_objects(labels, max_label=n) if n else []
        sizes = component_sizes(labels, boxes, n)[1:]
        lo = np.array([[b.start for b in box] for box in boxes], np.int64).reshape(n, 3)
        hi = np.array([[b.stop for b in box] for box in boxes], np.int64).reshape(n, 3)
        lo[:, 0] += start
        hi[:, 0] += start
        # The boundary slices' labels are all the joining needs: the slab's labels are dropped here.
        parts[start] = (stop, n, sizes, lo, hi, labels[0].copy(), labels[-1].copy())

    parallel_slabs(label_slab, mask.shape[0], threads=threads)
    starts = sorted(parts)
    offsets = np.cumsum([0] + [parts[s][1] for s in starts])  # slab k's label j is number offsets[k] + j - 1
    total = int(offsets[-1])
    if total == 0:
        return None
    sizes = np.concatenate([parts[s][2] for s in starts])
    lo = np.concatenate([parts[s][3] for s in starts])
    hi = np.concatenate([parts[s][4] for s in starts])
    pairs = []  # each touching pair of parts once, as the number part_below * total + part_above
    for k in range(len(starts) - 1):  # the last slice of slab k against the first of slab k + 1
        below, above = parts[starts[k]][6], parts[starts[k + 1]][5]
        touching = (below > 0) & (above > 0)
        if touching.any():
            # A body touches the boundary in tens of thousands of voxels but in a handful of part
            # pairs: deduplicated as single integers (np.unique over columns of a 2-row array
            # sorts structured rows and took 1.1 s for 32 slabs of a CT's body mask).
            below_part = below[touching].astype(np.int64) + (offsets[k] - 1)
            above_part = above[touching].astype(np.int64) + (offsets[k + 1] - 1)
            pairs.append(np.unique(below_part * total + above_part))
    if pairs:
        keys = np.unique(np.concatenate(pairs))
        graph = coo_matrix((np.ones(keys.size, np.int8), (keys // total, keys % total)), shape=(total, total))
        count, component = connected_components(graph, directed=False)
    else:
        count, component = total, np.arange(total)
    joined_sizes = np.bincount(component, weights=sizes, minlength=count)
    first = np.full(count, total, np.int64)
    np.minimum.at(first, component, np.arange(total))  # each joined component's first part (scan order)
    best = np.flatnonzero(joined_sizes == joined_sizes.max())
    winner = best[np.argmin(first[best])]
    members = component == winner
    start, stop = lo[members].min(axis=0), hi[members].max(axis=0)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
