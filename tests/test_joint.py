"""The one-stage model (`stage = "joint"`): 3-class target and sampling, training through the CLI,
per-class validation, one-stage prediction through `predict --joint`, and its configuration errors."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from livseg_jax import predict
from livseg_jax.config import base_config
from livseg_jax.data import pipeline, stages
from livseg_jax.data.preprocess import PreprocessSettings
from livseg_jax.inference.two_stage import (
    Predictor,
    StageModel,
    load_stage_model,
    predict_case,
    predict_joint_case,
)
from livseg_jax.models import build_model, check_patch_shape
from livseg_jax.run_dir import load_config, write_variables
from livseg_jax.training import logging as run_logging
from livseg_jax.training.loop import dataset_cases, train_and_evaluate, validate

REPO = pathlib.Path(__file__).resolve().parents[1]
WINDOW = (16, 32, 32)
TINY = ["--config.model.name=unet", "--config.model.features=(4,8,8)"]


def load_joint_config(arg=""):
    spec = importlib.util.spec_from_file_location("cfg_joint", REPO / "configs" / "joint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ------------------------------------------------------------------------------ stage rules


def test_joint_target_is_the_label_map_and_the_stage_needs_three_classes():
    label = np.array([[[0, 1, 2, 1]]], np.uint8)
    target = stages.stage_target(label, "joint")
    np.testing.assert_array_equal(target, label)
    assert target.dtype == np.uint8
    stages.check_stage("joint", 3)
    stages.check_stage("liver", 2)
    with pytest.raises(ValueError, match=r"'joint' predicts 3 classes but model.num_classes = 2"):
        stages.check_stage("joint", 2)
    with pytest.raises(ValueError, match=r"'tumor' predicts 2 classes but model.num_classes = 3"):
        stages.check_stage("tumor", 3)
    with pytest.raises(ValueError, match="stage must be one of"):
        stages.check_stage("kidney", 2)


def test_joint_foreground_sample_splits_evenly_between_liver_and_tumour():
    label = np.zeros((20, 30, 30), np.uint8)
    label[2:18, 3:27, 3:27] = 1
    label[5:7, 5:8, 5:8] = 2  # 18 tumour voxels in 9198 liver voxels
    coords = pipeline.foreground_sample(label, "joint", seed=3)
    classes = label[tuple(coords.T)]
    assert len(coords) <= pipeline.MAX_FOREGROUND_SAMPLES
    assert np.count_nonzero(classes == 1) == np.count_nonzero(classes == 2) == np.count_nonzero(label == 1)
    assert set(map(tuple, coords[classes == 2])) == set(map(tuple, np.argwhere(label == 2)))
    # No tumour: every centre on the liver. Binary stages: a uniform sample of their target.
    label[label == 2] = 1
    assert set(label[tuple(pipeline.foreground_sample(label, "joint").T)].tolist()) == {1}
    np.testing.assert_array_equal(pipeline.foreground_sample(label, "liver"), np.argwhere(label >= 1))
    assert len(pipeline.foreground_sample(np.zeros_like(label), "joint")) == 0


def test_joint_foreground_sample_is_capped_and_balanced_for_large_classes(monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_FOREGROUND_SAMPLES", 100)
    label = np.ones((10, 10, 10), np.uint8)
    label[:3] = 2
    classes = label[tuple(pipeline.foreground_sample(label, "joint").T)]
    assert np.count_nonzero(classes == 1) == np.count_nonzero(classes == 2) == 50


def test_joint_patches_carry_all_three_labels(tmp_path):
    image = np.zeros((16, 32, 32), np.float32)
    label = np.zeros((16, 32, 32), np.uint8)
    label[4:12, 8:24, 8:24] = 1
    label[6:9, 12:15, 12:15] = 2
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "label.npy", label)
    case = pipeline.StageCase("c", str(tmp_path / "image.npy"), str(tmp_path / "label.npy"), (0, 0, 0),
                              label.shape, pipeline.foreground_sample(label, "joint"))
    config = base_config().data
    config.patch_size = (8, 8, 8)
    config.foreground_fraction = 1.0
    sampler = pipeline.PatchSampler([case], "joint", config, seed=0, background_value=-1.0)
    labels = np.stack([sampler(i)["label"] for i in range(40)])
    assert labels.dtype == np.int32 and set(np.unique(labels).tolist()) == {0, 1, 2}
    # Half the foreground centres lie on the 27-voxel tumour: most 8^3 patches then hold tumour.
    assert 10 <= sum(bool((patch == 2).any()) for patch in labels) <= 38


def test_validation_scores_liver_and_tumour_and_judges_by_their_mean(tmp_path):
    label = np.zeros((16, 32, 32), np.uint8)
    label[2:14, 4:28, 4:28] = 1
    label[5:9, 10:16, 10:16] = 2
    np.save(tmp_path / "image.npy", label.astype(np.float32))  # the image spells out its labels
    np.save(tmp_path / "label.npy", label)
    case = pipeline.StageCase("case7", str(tmp_path / "image.npy"), str(tmp_path / "label.npy"), (0, 0, 0),
                              label.shape, np.zeros((0, 3), np.int32))
    config = load_joint_config()
    config.data.patch_size = (16, 16, 16)

    def oracle(highest):
        def predict_fn(variables, x):  # class = the voxel's value, at most `highest`
            return jax.nn.one_hot(jnp.clip(jnp.round(x[..., 0]), 0, highest).astype(jnp.int32), 3)
        return predict_fn

    perfect = validate(None, None, [case], config, oracle(2))
    assert perfect == {"dice_liver_case7": 1.0, "dice_tumor_case7": 1.0, "dice_liver": 1.0, "dice_tumor": 1.0,
                       "dice": 1.0}
    no_tumour = validate(None, None, [case], config, oracle(1))
    assert (no_tumour["dice_liver"], no_tumour["dice_tumor"], no_tumour["dice"]) == (1.0, 0.0, 0.5)


# ----------------------------------------------------------------------------------- config


def test_joint_config_presets_set_three_classes_and_fit_the_network():
    demo, paper = load_joint_config(), load_joint_config("paper,unet")
    for config in (demo, paper):
        assert (config.stage, config.model.num_classes) == ("joint", 3)
        check_patch_shape(tuple(config.data.patch_size), len(config.model.features))
    assert tuple(paper.model.features) == (16, 32, 64, 128, 256) and paper.model.name == "unet"
    assert max(demo.model.features) < max(paper.model.features)
    with pytest.raises(ValueError, match=r"configs/joint.py: unknown argument"):
        load_joint_config("bogus")


def test_joint_run_with_two_classes_is_refused_before_any_work(tmp_path):
    config = load_joint_config()
    config.model.num_classes = 2
    config.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"model.num_classes = 2; set model.num_classes = 3"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


# -------------------------------------------------------------- one-stage prediction, arrays

SHAPE = (24, 40, 48)
SPACING = (2.5, 1.0, 1.0)
LIVER = (slice(6, 16), slice(10, 26), slice(10, 30))
TUMOUR = (slice(9, 12), slice(14, 18), slice(14, 18))
BLOB = (slice(18, 20), slice(30, 33), slice(38, 41))  # liver-bright, apart from the liver
BONE = (slice(6, 10), slice(10, 14), slice(33, 36))  # tumour-bright after the HU window, apart
EXACT = dict(body_threshold_hu=-500.0, inplane_factor=1, target_slice_spacing=0.0,
             hu_min=-200.0, hu_max=200.0, hu_scale=200.0)


def phantom():
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[2:22, 4:36, 4:44] = 0.0
    ct[LIVER] = 150.0
    ct[BLOB] = 150.0
    ct[TUMOUR] = 250.0
    ct[BONE] = 400.0
    return ct


def threshold_probs(low, high):
    """Returns a window function with one-hot classes: 0 below `low`, 1 up to `high`, 2 above."""
    def window_fn(variables, x):
        x = x[..., 0]
        return jax.nn.one_hot((x > low).astype(jnp.int32) + (x > high).astype(jnp.int32), 3)
    return window_fn


def stage_model(name, window_fn, num_classes):
    return StageModel(stage=name, window_fn=window_fn, variables=None, num_classes=num_classes, window=(8, 16, 16),
                      preprocessing=PreprocessSettings.from_config(EXACT), overlap=0.5, batch_size=2,
                      liver_margin_mm=5.0)


def test_joint_prediction_keeps_the_largest_liver_with_its_tumour_and_matches_two_stages():
    expected = np.zeros(SHAPE, np.uint8)
    expected[LIVER] = 1
    expected[TUMOUR] = 2
    joint = stage_model("joint", threshold_probs(0.5, 0.9), 3)
    result = predict_joint_case(phantom(), SPACING, joint)
    # The blob (class 1) and the bone (class 2) are other components: removed with the liver rule.
    np.testing.assert_array_equal(result.labels, expected)
    assert result.liver_found and result.info["tumor_voxels"] == np.count_nonzero(expected == 2)
    assert result.info["tumor_voxels_raw"] > result.info["tumor_voxels"]
    assert {"preprocess", "joint_inference", "joint_postprocess", "restore"} <= result.timings.keys()

    def binary(threshold):
        def window_fn(variables, x):
            p = (x > threshold).astype(jnp.float32)
            return jnp.concatenate([1 - p, p], axis=-1)
        return window_fn

    two = predict_case(phantom(), SPACING, stage_model("liver", binary(0.5), 2), stage_model("tumor", binary(0.9), 2))
    np.testing.assert_array_equal(two.labels, result.labels)


def test_joint_prediction_without_liver_is_all_background_with_a_warning():
    result = predict_joint_case(phantom(), SPACING, stage_model("joint", threshold_probs(5.0, 6.0), 3))
    assert not result.liver_found and not result.labels.any() and result.labels.shape == SHAPE
    assert "found no liver" in result.warnings[0]


def test_joint_model_is_refused_in_a_two_stage_role_and_the_roles_must_fit():
    joint = stage_model("joint", threshold_probs(0.5, 0.9), 3)
    liver = stage_model("liver", threshold_probs(0.5, 0.9), 2)
    with pytest.raises(ValueError, match="'joint' model was given as the liver model"):
        predict_case(phantom(), SPACING, joint)
    with pytest.raises(ValueError, match="needs a 3-class 'joint' model"):
        predict_joint_case(phantom(), SPACING, liver)
    with pytest.raises(ValueError, match="give no tumour model with it"):
        Predictor(tumor=liver, joint=joint)
    with pytest.raises(ValueError, match="exactly one of them"):
        Predictor(liver, joint=joint)


# ------------------------------------------------------------ train CLI -> predict CLI, end to end


def run_train_cli(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "livseg_jax.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """A joint run trained for 2 steps by `python -m livseg_jax.train --config=configs/joint.py`."""
    root = tmp_path_factory.mktemp("joint")
    done = run_train_cli(
        f"--config={REPO / 'configs' / 'joint.py'}", f"--workdir={root / 'run'}",
        f"--config.data.cache_dir={root / 'cache'}", "--config.data.synthetic.num_cases=3",
        "--config.data.synthetic.shape=(96,96,32)", "--config.data.synthetic.spacing=(2.0,2.0,4.0)",
        "--config.data.num_val_cases=1", f"--config.data.patch_size={WINDOW}", "--config.data.batch_size=2",
        "--config.train.num_epochs=1", "--config.train.steps_per_epoch=2", "--config.train.eval_every_epochs=1",
        "--config.inference.overlap=0.25", *TINY, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", done.stdout


def test_joint_training_cli_logs_per_class_validation_and_keeps_the_best(joint_run):
    run, stdout = joint_run
    config = load_config(run)
    assert (config.stage, config.model.num_classes) == ("joint", 3)
    (val,) = [r for r in run_logging.read_metrics(run) if r["kind"] == "val"]
    assert {"dice_liver", "dice_tumor"} <= val.keys()
    assert val["dice"] == pytest.approx((val["dice_liver"] + val["dice_tumor"]) / 2)
    assert sum(k.startswith("dice_tumor_") for k in val) == 1
    assert json.loads((run / "best.json").read_text())["dice"] == pytest.approx(val["dice"])
    train = [r for r in run_logging.read_metrics(run) if r["kind"] == "train"]
    assert train and all(np.isfinite(r["loss"]) for r in train)
    assert "done: step 2" in stdout


def assert_same_grid(output, source):
    out, src = nib.load(output), nib.load(source)
    assert out.shape == src.shape
    np.testing.assert_array_equal(out.affine, src.affine)
    assert out.get_data_dtype() == np.uint8
    return np.asarray(out.dataobj)


def test_predict_joint_writes_label_maps_on_the_input_grid(joint_run, tmp_path, capsys):
    run, _ = joint_run
    ct = dataset_cases(load_config(run))[-1].image
    out = tmp_path / "out"
    assert predict.main(["--joint", str(run), "-i", str(ct), "-o", str(out), "--no-progress", "--png"]) == 0
    (seg,) = out.glob("*.nii.gz")
    labels = assert_same_grid(seg, ct)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    record = json.loads(seg.with_name(seg.name.replace(".nii.gz", "_timings.json")).read_text())
    assert {"joint_inference", "joint_postprocess", "write", "png"} <= record["timings_s"].keys()
    assert record["run"]["settings"]["joint"]["stage"] == "joint"
    assert record["run"]["settings"]["liver"] is None and record["run"]["settings"]["tumor"] is None
    assert record["label_voxels"]["liver"] == np.count_nonzero(labels >= 1)
    assert "compiled in joint" in capsys.readouterr().out


def test_predict_joint_writes_tumour_labels(joint_run, tmp_path):
    """A joint model whose final head favours tumour everywhere: the map is tumour wherever the
    body crop reaches, so the CLI really writes label 2."""
    run, _ = joint_run
    config = load_config(run)
    variables = load_stage_model(run, "joint", deploy=False).variables
    variables = jax.tree.map(np.asarray, variables)
    heads = sorted(k for k in variables["params"] if k.startswith("head"))
    variables["params"][heads[-1]]["kernel"] = np.zeros_like(variables["params"][heads[-1]]["kernel"])
    variables["params"][heads[-1]]["bias"] = np.array([0.0, 0.0, 20.0], np.float32)
    biased = write_variables(tmp_path / "tumour_everywhere", variables, config)
    ct = dataset_cases(config)[-1].image
    out = tmp_path / "seg.nii.gz"
    assert predict.main(["--joint", str(biased), "-i", str(ct), "-o", str(out), "--no-progress"]) == 0
    labels = assert_same_grid(out, ct)
    assert set(np.unique(labels).tolist()) == {0, 2}
    assert np.count_nonzero(labels == 2) > labels.size // 4


def test_wrong_model_flags_are_one_line_errors(joint_run, tmp_path, capsys):
    run, _ = joint_run
    ct = dataset_cases(load_config(run))[-1].image
    common = ["-i", str(ct), "-o", str(tmp_path / "o")]
    cases = [
        (["--joint", str(run), "--tumor", str(run)], "--tumor cannot be used with --joint"),
        (["--joint", str(run), "--liver", str(run)], "--liver cannot be used with --joint"),
        ([], "give --liver RUN [--tumor RUN] (two-stage) or --joint RUN (one-stage)"),
        (["--liver", str(run)], "is a 'joint' model (config.json stage), but it was given as the 'liver' model; "
                                "a one-stage model predicts alone (predict --joint)"),
    ]
    for flags, message in cases:
        assert predict.main([*flags, *common, "--no-progress"]) == 1
        # Other lines may warn that the XLA flags come too late in this process (JAX has started).
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
        assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert not (tmp_path / "o").exists()


def test_loading_a_joint_run_with_two_classes_is_refused_naming_the_run(joint_run, tmp_path):
    run, _ = joint_run
    config = load_config(run)
    config.model.num_classes = 2
    shapes = jax.eval_shape(lambda: build_model(config.model).init(jax.random.key(0), jnp.zeros((1, *WINDOW, 1)),
                                                                   train=False))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    bad = write_variables(tmp_path / "two_classes", variables, config)
    with pytest.raises(ValueError, match=r"two_classes: config.json: stage 'joint' predicts 3 classes"):
        load_stage_model(bad, "joint")
