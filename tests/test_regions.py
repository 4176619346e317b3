"""Region helpers: bounding boxes, crop and paste, connected components and their sizes."""

import numpy as np
import pytest
from scipy import ndimage

from livseg_jax.data import regions


def test_bounding_box_is_tight_and_none_for_empty():
    m = np.zeros((10, 11, 12), bool)
    assert regions.bbox_of(m) is None
    m[2, 3, 4] = m[5, 9, 7] = True
    assert regions.bbox_of(m) == (slice(2, 6), slice(3, 10), slice(4, 8))


def test_bbox_margin_crop_and_paste():
    mask = np.zeros((10, 12, 14), bool)
    mask[4:6, 5:7, 6:9] = True
    assert regions.bbox_of(np.zeros_like(mask)) is None
    box = regions.bbox_of(mask, margin_vox=(1, 2.5, 10))
    assert box == (slice(3, 7), slice(2, 10), slice(0, 14))
    data = np.arange(mask.size).reshape(mask.shape)
    cropped = regions.crop_to_bbox(data, box)
    pasted = regions.paste_into(cropped, box, data.shape, fill=-1)
    np.testing.assert_array_equal(pasted[box], data[box])
    assert (pasted == -1).sum() == data.size - cropped.size


@pytest.mark.parametrize("seed", range(5))
def test_bbox_equals_the_per_axis_extent_of_random_masks(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((9, 13, 11), bool)
    mask[tuple(rng.integers(0, n, 4) for n in mask.shape)] = True
    margin = rng.uniform(0, 3, 3)
    coords = np.argwhere(mask)
    expected = tuple(slice(max(0, int(lo - np.ceil(m))), min(n, int(hi + 1 + np.ceil(m))))
                     for lo, hi, m, n in zip(coords.min(0), coords.max(0), margin, mask.shape, strict=True))
    assert regions.bbox_of(mask, margin) == expected


def test_union_box_holds_both_boxes():
    a, b = (slice(1, 3), slice(4, 6), slice(0, 2)), (slice(2, 5), slice(0, 1), slice(1, 2))
    assert regions.union_box(a, b) == (slice(1, 5), slice(0, 6), slice(0, 2))
    assert regions.union_box(None, b) == b and regions.union_box(a, None) == a
    assert regions.union_box(None, None) is None


def test_largest_component_box_and_sizes_with_few_and_many_components():
    rng = np.random.default_rng(3)
    blobs = np.zeros((6, 30, 30), bool)  # three components: the per-box counting path
    blobs[0:2, 0:5, 0:5] = blobs[3:6, 10:20, 10:14] = blobs[1:4, 25:30, 20:30] = True
    for mask in (rng.random((6, 30, 30)) < 0.15, blobs):  # hundreds of specks: the bincount path
        labels, n = ndimage.label(mask)
        assert n == 3 if mask is blobs else n > 64
        sizes = np.bincount(labels.ravel())
        boxes = ndimage.find_objects(labels)
        np.testing.assert_array_equal(regions.component_sizes(labels, boxes, n)[1:], sizes[1:])
        np.testing.assert_array_equal(regions.component_sizes(labels, None, n)[1:], sizes[1:])
        big, box = regions.largest_component_box(mask)
        k = int(np.argmax(sizes[1:])) + 1
        np.testing.assert_array_equal(big, labels == k)
        assert box == boxes[k - 1]
        assert regions.largest_component_box(mask, with_mask=False) == (None, box)
    empty, box = regions.largest_component_box(np.zeros((2, 4, 4), bool))
    assert box is None and not empty.any()
    np.testing.assert_array_equal(regions.component_sizes(np.zeros((0, 0, 0), np.int32), None, 0), [0])


def test_largest_component_keeps_the_biggest_and_connectivity_decides_what_touches():
    mask = np.zeros((6, 6, 6), bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[2:4, 2:4, 2:4] = True  # 8 voxels touching the first only at a corner
    mask[4:6, 4:6, 3] = True  # 4 voxels, touching the second only along an edge
    face = regions.largest_component(mask, connectivity=1)
    assert face.sum() == 8 and (face[0:2, 0:2, 0:2].all() or face[2:4, 2:4, 2:4].all())
    edge = regions.largest_component(mask, connectivity=2)
    assert edge.sum() == 12 and edge[2:4, 2:4, 2:4].all() and edge[4:6, 4:6, 3].all()
    np.testing.assert_array_equal(regions.largest_component(mask, connectivity=3), mask)
    assert not regions.largest_component(np.zeros((3, 3, 3), bool)).any()


def test_label_components_connectivity():
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner neighbours
    assert regions.label_components(mask, 1)[1] == 2
    assert regions.label_components(mask, 2)[1] == 2
    labels, n = regions.label_components(mask, 3)
    assert n == 1 and labels[0, 0, 0] == labels[1, 1, 1] == 1
