"""Tumour post-processing: minimum lesion volume, probability threshold, the choice on validation data, predict."""

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_unet_variables

from livseg_jax import postprocess as cli
from livseg_jax.config import base_config
from livseg_jax.data.preprocess import PreprocessSettings
from livseg_jax.inference import postprocess as pp
from livseg_jax.inference.two_stage import StageModel, load_stage_model, predict_case, predict_joint_case
from livseg_jax.metrics import lesion_detection, overlap_metrics
from livseg_jax.models import build_model
from livseg_jax.run_dir import write_variables

# ---------------------------------------------------------------------- minimum volume, threshold


def blobs() -> np.ndarray:
    """Returns a mask with a 2x2x2 (8 voxels) and a 3x3x3 (27 voxels) component."""
    mask = np.zeros((12, 12, 12), bool)
    mask[1:3, 1:3, 1:3] = True
    mask[6:9, 6:9, 6:9] = True
    return mask


@pytest.mark.parametrize(("spacing", "min_volume", "kept"), [
    ((1.0, 1.0, 1.0), 20.0, (False, True)),   # 8 and 27 mm^3
    ((2.0, 1.0, 1.0), 20.0, (False, True)),   # 16 and 54 mm^3
    ((3.0, 1.0, 1.0), 20.0, (True, True)),    # 24 and 81 mm^3
    ((2.0, 1.0, 1.0), 54.0, (False, True)),   # exactly the minimum is kept
    ((2.0, 1.0, 1.0), 54.1, (False, False)),
    ((1.0, 1.0, 1.0), 0.0, (True, True)),
])
def test_components_below_the_minimum_volume_go_with_the_voxel_volume_from_the_spacing(spacing, min_volume, kept):
    out = pp.remove_small_components(blobs(), spacing, min_volume)
    assert out.dtype == bool
    assert (out[1:3, 1:3, 1:3].all(), out[6:9, 6:9, 6:9].all()) == kept
    assert not (out & ~blobs()).any()  # nothing is added


def test_diagonal_neighbours_are_one_lesion_by_default_and_two_with_face_connectivity():
    mask = np.zeros((6, 6, 6), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[3, 3, 3] = True  # touches the cube at a corner
    assert pp.remove_small_components(mask, (1, 1, 1), 9).sum() == 9
    assert pp.remove_small_components(mask, (1, 1, 1), 9, connectivity=1).sum() == 0
    with pytest.raises(ValueError, match="spacing"):
        pp.remove_small_components(mask, (1, 0, 1), 9)


def test_threshold_none_is_the_argmax_and_a_threshold_uses_the_last_class():
    rng = np.random.default_rng(0)
    for k in (2, 3):
        probs = rng.dirichlet(np.ones(k), size=(5, 6, 7)).astype(np.float32)
        np.testing.assert_array_equal(pp.threshold_tumor(probs, None), probs.argmax(-1) == k - 1)
        np.testing.assert_array_equal(pp.threshold_tumor(probs, 0.3), probs[..., -1] > 0.3)
    two = rng.dirichlet(np.ones(2), size=(5, 6, 7))
    np.testing.assert_array_equal(pp.threshold_tumor(two, 0.5), pp.threshold_tumor(two, None))
    with pytest.raises(ValueError, match="probabilities"):
        pp.threshold_tumor(np.zeros((4, 4, 4)), 0.5)


def test_settings_validate_and_round_trip_through_the_run_directory(tmp_path):
    with pytest.raises(ValueError, match="tumor_threshold"):
        pp.PostprocessSettings(tumor_threshold=1.5)
    with pytest.raises(ValueError, match="tumor_min_volume_mm3"):
        pp.PostprocessSettings(tumor_min_volume_mm3=-1)
    assert pp.read_settings(tmp_path) is None
    settings = pp.PostprocessSettings(0.4, 50.0)
    pp.write_settings(tmp_path, settings, {"objective": "x"})
    assert pp.read_settings(tmp_path) == settings
    (tmp_path / pp.POSTPROCESS_FILE).write_text(json.dumps({"settings": {"tumor_threshold": 0.4, "size": 3}}))
    with pytest.raises(ValueError, match=r"postprocess.json.*unknown key.*size"):
        pp.read_settings(tmp_path)


# ------------------------------------------------------------------------------------- choice


def constructed_case(seed: int) -> pp.ValidationCase:
    """A true lesion the argmax misses (p = 0.4), a large false region at p = 0.25, small sure false blobs."""
    rng = np.random.default_rng(seed)
    shape = (20, 24, 24)
    p = np.full(shape, 0.02, np.float32)
    truth = np.zeros(shape, bool)
    truth[4:9, 4:9, 4:9] = True  # 125 mm^3
    p[truth] = 0.4
    p[12:18, 12:20, 12:20] = 0.25  # 384 mm^3, no tumour
    for corner in ((1, 15, 2), (15, 2, 2), (10, 20, 14)):  # 8 mm^3 each, sure but false
        p[tuple(slice(c, c + 2) for c in corner)] = 0.95
    p = np.clip(p + rng.normal(0, 0.01, shape), 0, 1).astype(np.float32)
    return pp.ValidationCase(f"case{seed}", np.stack([1 - p, p], -1), truth, (1.0, 1.0, 1.0))


def reference_rows(cases, thresholds, min_volumes, fp_penalty):
    """The grid's scores the plain way: threshold, remove, then the metrics module's Dice and lesion counts."""
    rows = []
    for t, v in itertools.product(thresholds, min_volumes):
        dices, fps = [], []
        for c in cases:
            mask = pp.remove_small_components(pp.threshold_tumor(c.probs, t), c.spacing, v)
            dices.append(overlap_metrics(mask, c.truth)["dice"])
            fps.append(lesion_detection(mask, c.truth, c.spacing)["n_false_positive"])
        rows.append((t, v, np.mean(dices), np.mean(fps), np.mean(dices) - fp_penalty * np.mean(fps)))
    return rows


def test_the_choice_lowers_the_threshold_and_removes_the_small_false_lesions():
    cases = [constructed_case(0), constructed_case(1)]
    thresholds, volumes = (None, 0.3, 0.5), (0.0, 10.0, 200.0)
    settings, rows = pp.choose_settings(cases, thresholds, volumes, fp_penalty=0.01)
    assert (settings.tumor_threshold, settings.tumor_min_volume_mm3) == (0.3, 10.0)
    expected = reference_rows(cases, thresholds, volumes, 0.01)
    assert len(rows) == len(expected)
    for row, (t, v, dice, fps, score) in zip(rows, expected, strict=True):
        assert (row["tumor_threshold"], row["tumor_min_volume_mm3"]) == (t, v)
        assert row["dice"] == pytest.approx(dice) and row["false_positive_lesions"] == pytest.approx(fps)
        assert row["objective"] == pytest.approx(score)
    assert max(r["objective"] for r in rows) == pytest.approx(rows[4]["objective"])  # (0.3, 10)


def test_the_false_positive_penalty_can_prefer_removing_a_small_true_lesion_with_many_false_ones():
    shape = (12, 12, 24)
    p = np.zeros(shape, np.float32)
    truth = np.zeros(shape, bool)
    truth[1:3, 1:3, 1:3] = True
    p[truth] = 0.9
    for i in range(5):
        p[6:8, 6:8, 4 * i:4 * i + 2] = 0.9
    case = pp.ValidationCase("c", np.stack([1 - p, p], -1), truth, (1.0, 1.0, 1.0))
    assert pp.choose_settings([case], (None,), (0.0, 10.0), fp_penalty=0.0)[0].tumor_min_volume_mm3 == 0.0
    assert pp.choose_settings([case], (None,), (0.0, 10.0), fp_penalty=0.2)[0].tumor_min_volume_mm3 == 10.0


def test_ties_keep_the_earlier_grid_point_and_a_region_limits_the_tumour():
    case = constructed_case(0)  # thresholds 0.3 and 0.35 give the same mask: a tie
    assert pp.choose_settings([case], (0.3, 0.35), (0.0,))[0].tumor_threshold == 0.3
    assert pp.choose_settings([case], (0.35, 0.3), (0.0,))[0].tumor_threshold == 0.35
    _, rows = pp.choose_settings([case], (0.2, 0.3), (0.0,), fp_penalty=0.0)
    assert rows[0]["dice"] < rows[1]["dice"]  # at 0.2 the false region joins
    region = np.zeros(case.truth.shape, bool)
    region[:10] = True  # the lesion's slab: the false region lies outside
    limited = pp.ValidationCase("r", case.probs, case.truth, case.spacing, region)
    _, rows = pp.choose_settings([limited], (0.2, 0.3), (0.0,), fp_penalty=0.0)
    assert rows[0]["dice"] == rows[1]["dice"]


# ------------------------------------------------------------------------- applied in predict

SHAPE = (24, 40, 48)
SPACING = (2.5, 1.0, 1.0)
LIVER = (slice(6, 16), slice(10, 26), slice(10, 30))
TUMOUR = (slice(9, 12), slice(14, 18), slice(14, 18))  # 48 voxels = 120 mm^3
SPECK = (slice(13, 14), slice(22, 24), slice(25, 27))  # 4 voxels = 10 mm^3, inside the liver
EXACT = dict(body_threshold_hu=-500.0, inplane_factor=1, target_slice_spacing=0.0,
             hu_min=-200.0, hu_max=200.0, hu_scale=200.0)


def phantom() -> np.ndarray:
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[2:22, 4:36, 4:44] = 0.0
    ct[LIVER] = 150.0  # scaled 0.75
    ct[TUMOUR] = 250.0  # scaled 1.0 (clipped)
    ct[SPECK] = 250.0
    return ct


def liver_fn(variables, x):
    p = (x > 0.5).astype(jnp.float32)
    return jnp.concatenate([1 - p, p], axis=-1)


def tumour_fn(variables, x):
    """p(tumour) = 0.45 on the bright voxels: the argmax finds no tumour, a threshold of 0.4 does."""
    p = jnp.where(x > 0.9, 0.45, 0.05).astype(jnp.float32)
    return jnp.concatenate([1 - p, p], axis=-1)


def stage(name, window_fn, postprocess=None, num_classes=2):
    return StageModel(stage=name, window_fn=window_fn, variables=None, num_classes=num_classes,
                      window=(8, 16, 16), preprocessing=PreprocessSettings.from_config(EXACT), overlap=0.5,
                      batch_size=2, liver_margin_mm=5.0, postprocess=postprocess)


def test_predict_applies_the_tumour_runs_threshold_and_minimum_volume():
    liver = stage("liver", liver_fn)
    plain = predict_case(phantom(), SPACING, liver, stage("tumor", tumour_fn))
    assert not (plain.labels == 2).any() and "postprocess" not in plain.info
    thresholded = predict_case(phantom(), SPACING, liver, stage("tumor", tumour_fn, pp.PostprocessSettings(0.4)))
    assert thresholded.labels[TUMOUR].min() == 2 and thresholded.labels[SPECK].min() == 2
    full = predict_case(phantom(), SPACING, liver, stage("tumor", tumour_fn, pp.PostprocessSettings(0.4, 50.0)))
    expected = np.zeros(SHAPE, np.uint8)
    expected[LIVER] = 1
    expected[TUMOUR] = 2
    np.testing.assert_array_equal(full.labels, expected)  # the speck is liver again
    assert full.info["postprocess"]["tumor_voxels_removed"] == 4
    assert full.info["postprocess"]["tumor_min_volume_mm3"] == 50.0


def test_the_threshold_costs_no_second_sliding_window():
    calls = {None: [], 0.4: []}

    def counted(threshold):
        def window_fn(variables, x):
            calls[threshold].append(x.shape)
            return tumour_fn(variables, x)
        return window_fn

    for threshold in calls:
        settings = None if threshold is None else pp.PostprocessSettings(threshold)
        predict_case(phantom(), SPACING, stage("liver", liver_fn), stage("tumor", counted(threshold), settings))
    assert len(calls[0.4]) == len(calls[None]) > 0


def test_predict_joint_applies_the_stored_values():
    def joint_fn(variables, x):
        liver = (x > 0.5).astype(jnp.float32)
        tumour = jnp.where(x > 0.9, 0.45, 0.0)
        return jnp.concatenate([1 - liver, liver * (1 - tumour), liver * tumour], axis=-1)

    joint = stage("joint", joint_fn, pp.PostprocessSettings(0.4, 50.0), num_classes=3)
    result = predict_joint_case(phantom(), SPACING, joint)
    assert result.labels[TUMOUR].min() == 2 and result.labels[SPECK].max() == 1
    assert (result.labels >= 1).sum() == np.prod([s.stop - s.start for s in LIVER])


def test_a_tumour_run_loads_its_postprocess_json_unless_turned_off(tmp_path):
    config = base_config()
    config.stage = "tumor"
    config.model.name = "unet"
    config.model.features = (2, 4, 4)
    config.data.patch_size = (16, 16, 16)
    variables = random_unet_variables(build_model(config.model, deploy=False), (16, 16, 16), 0)
    run = write_variables(tmp_path / "tumor", variables, config)
    assert load_stage_model(run, "tumor").postprocess is None
    pp.write_settings(run, pp.PostprocessSettings(0.6, 25.0))
    model = load_stage_model(run, "tumor")
    assert model.postprocess == pp.PostprocessSettings(0.6, 25.0)
    assert model.settings()["postprocess"]["tumor_threshold"] == 0.6
    assert load_stage_model(run, "tumor", postprocess=False).postprocess is None


def test_the_command_chooses_on_a_validation_case_with_the_ground_truth_liver():
    """The CLI's case builder: the tumour model sees the liver box of the ground truth, probabilities kept."""
    label = np.zeros(SHAPE, np.uint8)
    label[LIVER] = 1
    label[TUMOUR] = 2
    case = cli.validation_case("c", phantom(), label, SPACING, stage("tumor", tumour_fn))
    assert case.probs.shape == (20, 32, 40, 2)  # the body box, the tumour model's grid
    assert np.count_nonzero(case.probs[..., 1] > 0.4) == 48 + 4 and case.truth.sum() == 48
    assert case.probs[:2, ..., 1].max() == 0.0  # outside the liver box (2 slices margin): background
    settings, _ = pp.choose_settings([case], (None, 0.4), (0.0, 50.0))
    assert settings == pp.PostprocessSettings(0.4, 50.0)
    with pytest.raises(ValueError, match="tumour or joint"):
        cli.validation_case("c", phantom(), label, SPACING, stage("liver", liver_fn))


def test_the_command_writes_postprocess_json_that_predict_then_loads(tmp_path, capsys):
    from livseg_jax.data.synthetic import write_phantom

    config = base_config()
    config.stage = "tumor"
    config.model.name = "unet"
    config.model.features = (2, 4, 4)
    config.data.patch_size = (16, 16, 16)
    config.preprocess.update(EXACT)
    variables = random_unet_variables(build_model(config.model, deploy=False), (16, 16, 16), 1)
    run = write_variables(tmp_path / "tumor", variables, config)
    label = np.zeros(SHAPE, np.uint8)
    label[LIVER] = 1
    label[TUMOUR] = 2
    cases = tmp_path / "val"
    cases.mkdir()
    # (D, H, W) -> the RAS (x, y, z) arrays write_phantom takes
    write_phantom(phantom().transpose(2, 1, 0)[::-1, ::-1], label.transpose(2, 1, 0)[::-1, ::-1],
                  SPACING[::-1], cases / "volume-1.nii.gz", cases / "segmentation-1.nii.gz")
    argv = ["--run", str(run), "--cases", str(cases), "--thresholds", "none,0.5,0.9", "--min-volumes", "0,50",
            "--no-progress"]
    assert cli.main([*argv, "--dry-run"]) == 0 and pp.read_settings(run) is None
    assert cli.main(argv) == 0
    record = json.loads((run / pp.POSTPROCESS_FILE).read_text())
    assert record["cases"] == ["volume-1"] and record["liver_source"] == "ground truth"
    assert len(record["grid"]) == 6 and record["chosen"]["objective"] == max(r["objective"] for r in record["grid"])
    assert load_stage_model(run, "tumor").postprocess == pp.PostprocessSettings.from_dict(record["settings"])
    assert "chosen on 1 case(s)" in capsys.readouterr().out
    assert cli.main(["--run", str(run), "--cases", str(cases), "--thresholds", "none,x"]) == 1
    assert "--thresholds: 'x' is not a number" in capsys.readouterr().err


def test_default_cases_are_the_runs_validation_split(tmp_path):
    from livseg_jax.run_dir import save_config

    for i in (1, 2, 3):
        (tmp_path / f"ct{i}.nii.gz").touch()
        (tmp_path / f"ct{i}_label.nii.gz").touch()
    (tmp_path / "cases.txt").write_text("".join(f"ct{i}.nii.gz ct{i}_label.nii.gz\n" for i in (1, 2, 3)))
    config = base_config()
    config.data.layout, config.data.list_file, config.data.num_val_cases = "list", str(tmp_path / "cases.txt"), 2
    save_config(tmp_path / "run", config)
    assert [c.case_id for c in cli.validation_files(tmp_path / "run", None)] == ["ct2", "ct3"]
    assert [c.case_id for c in cli.validation_files(tmp_path / "run", tmp_path / "cases.txt")] == ["ct1", "ct2", "ct3"]
    config.data.num_val_cases = 0
    save_config(tmp_path / "run", config)
    with pytest.raises(ValueError, match=r"no validation cases.*give --cases"):
        cli.validation_files(tmp_path / "run", None)
