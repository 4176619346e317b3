"""Stage rules: each stage's target, the liver crop margin in voxels and the liver crop."""

import numpy as np
import pytest

from livseg_jax.data import stages


def test_targets_are_liver_with_tumour_for_stage_one_and_tumour_for_stage_two():
    label = np.array([[[0, 1, 2]]], np.uint8)
    np.testing.assert_array_equal(stages.stage_target(label, "liver"), [[[0, 1, 1]]])
    np.testing.assert_array_equal(stages.stage_target(label, "tumor"), [[[0, 0, 1]]])
    assert stages.stage_target(label, "liver").dtype == np.uint8
    with pytest.raises(ValueError, match="stage must be"):
        stages.stage_target(label, "kidney")


def test_margin_rounds_up_to_whole_voxels_per_axis():
    assert stages.liver_crop_margin((2.5, 1.0, 1.0), 5.0) == (2, 5, 5)
    assert stages.liver_crop_margin((3.0, 0.7, 0.8), 5.0) == (2, 8, 7)
    assert stages.liver_crop_margin((1.0, 1.0, 1.0), 0.0) == (0, 0, 0)


def test_liver_crop_is_the_liver_box_grown_by_the_margin_and_clipped():
    liver = np.zeros((10, 20, 20), bool)
    liver[4:6, 8:10, 1:3] = True
    assert stages.liver_crop_box(liver, (2.0, 1.0, 1.0), 3.0) == (slice(2, 8), slice(5, 13), slice(0, 6))
    assert stages.liver_crop_box(np.zeros_like(liver), (2.0, 1.0, 1.0), 3.0) is None
