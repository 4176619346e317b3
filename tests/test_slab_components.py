"""The slab-parallel largest-component box equals scipy's whole-volume one, ties included."""

import numpy as np
import pytest

from livseg_jax.data import regions, slab_components
from livseg_jax.data.synthetic import make_phantom


def reference(mask):
    return regions.largest_component_box(mask, with_mask=False)[1]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.55])
def test_box_equals_scipys_on_random_masks(threads, density):
    rng = np.random.default_rng(int(density * 100) + threads)
    mask = rng.random((37, 19, 23)) < density  # from many islands to one percolating cluster
    assert slab_components.largest_component_box(mask, threads=threads) == reference(mask)


@pytest.mark.parametrize("threads", [2, 4])
def test_a_component_winding_across_every_slab_boundary_is_joined(threads):
    mask = np.zeros((40, 12, 12), bool)
    mask[:, 1, 1] = True  # a column through every slab ...
    mask[39, 1, 1:10] = True  # ... turning at the bottom
    mask[::2, 5:11, 5:11] = True  # and thicker slices, each its own component
    assert slab_components.largest_component_box(mask, threads=threads) == reference(mask)


@pytest.mark.parametrize("threads", [1, 3])
def test_equal_sizes_keep_the_component_scipy_numbers_first(threads):
    mask = np.zeros((24, 10, 10), bool)
    mask[20:24, 0:2, 0:2] = True  # 16 voxels, first in scan order at depth 20 ...
    mask[10:12, 6:10, 6:8] = True  # ... 16 voxels, first at depth 10: scipy numbers it first
    mask[2:4, 7:9, 0:4] = True  # 16 voxels, first at depth 2: the first of all
    mask[5:22, 4, 4] = True  # 17 voxels ... but split in two by a gap
    mask[12, 4, 4] = False
    assert slab_components.largest_component_box(mask, threads=threads) == reference(mask)
    assert reference(mask)[0] == slice(2, 4)


def test_empty_and_single_slice_masks():
    assert slab_components.largest_component_box(np.zeros((9, 4, 4), bool), threads=3) is None
    one = np.zeros((1, 6, 6), bool)
    one[0, 1:3, 2:5] = True
    assert slab_components.largest_component_box(one, threads=3) == reference(one)


def test_body_mask_of_a_phantom_ct():
    hu, _ = make_phantom((64, 64, 40), (1.5, 1.5, 3.0), seed=1)
    mask = np.ascontiguousarray(hu.transpose(2, 1, 0)) > -500
    assert slab_components.largest_component_box(mask, threads=4) == reference(mask)
