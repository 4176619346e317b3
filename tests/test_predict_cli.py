"""`python -m livseg_jax.predict` end to end: real CT geometry, evaluation of the output, bad inputs."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers import random_unet_variables

from livseg_jax import evaluate, predict, visualize
from livseg_jax.config import base_config
from livseg_jax.models import build_model
from livseg_jax.models.forms import REFERENCE_FORMS
from livseg_jax.run_dir import RunCheckpoints, save_config
from livseg_jax.xla_flags import GPU_FORM_FLAGS, model_xla_flags

PHASES = ("read", "preprocess", "liver_inference", "liver_postprocess", "restore", "write", "total")


def write_run(workdir, stage, seed=0, window=(16, 32, 32), **preprocess):
    """Writes a run directory (config.json + orbax checkpoint) of a tiny random U-Net; returns it."""
    c = base_config()
    c.stage = stage
    c.model.name = "unet"
    c.model.features = (2, 4, 4, 4, 4)
    c.data.patch_size = window
    c.inference.overlap = 0.25
    c.preprocess.update(preprocess)
    variables = random_unet_variables(build_model(c.model, deploy=False), window, seed)
    save_config(workdir, c)
    ckpt = RunCheckpoints(workdir, keep=1)
    ckpt.save(3, {"step": np.int32(3), **variables})
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def coarse_runs(tmp_path_factory):
    """Liver and tumour runs that preprocess coarsely (in-plane / 8, 4.8 mm slices): fast on CPU."""
    root = tmp_path_factory.mktemp("coarse_runs")
    pre = dict(inplane_factor=8, target_slice_spacing=4.8)
    return write_run(root / "liver", "liver", 0, **pre), write_run(root / "tumor", "tumor", 1, **pre)


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    """Liver and tumour runs with the default preprocessing and a (32, 32, 32) window."""
    root = tmp_path_factory.mktemp("default_runs")
    return (write_run(root / "liver", "liver", 2, window=(32, 32, 32)),
            write_run(root / "tumor", "tumor", 3, window=(32, 32, 32)))


@pytest.fixture(scope="module")
def ircad17(shared_data, tmp_path_factory):
    """3D-IRCADb-01 patient 1.17 imported to LiTS layout once for this module; returns the folder."""
    from livseg_jax.data import ircadb

    src = shared_data / "3Dircadb1" / "3Dircadb1.17"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    out = tmp_path_factory.mktemp("ircad")
    ircadb.import_ircadb(src, out, log=None)
    return out


def assert_same_grid(output: pathlib.Path, source: pathlib.Path):
    out, src = nib.load(output), nib.load(source)
    assert out.shape == src.shape
    np.testing.assert_array_equal(out.affine, src.affine)
    assert out.header.get_zooms() == src.header.get_zooms()
    assert int(out.header["qform_code"]) == int(src.header["qform_code"])
    assert int(out.header["sform_code"]) == int(src.header["sform_code"])
    assert out.get_data_dtype() == np.uint8
    labels = np.asarray(out.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    return labels


def read_timings(output: pathlib.Path) -> dict:
    record = json.loads(output.with_name(output.name.replace(".nii.gz", "_timings.json")).read_text())
    for phase in PHASES:
        assert record["timings_s"][phase] >= 0, phase
    # "total" is the case's own work, the sum of its phases; the wait for the device (another case
    # held it) is recorded apart (inference/folder.py), so it is not one of the parts.
    parts = sum(v for k, v in record["timings_s"].items() if k not in ("total", "wait_for_device"))
    assert abs(record["timings_s"]["total"] - parts) <= 0.001  # each rounded to 0.1 ms
    assert record["timings_s"]["wait_for_device"] >= 0
    return record


@pytest.mark.real_data
def test_real_ircad_case_predicts_on_the_input_grid_and_evaluates(coarse_runs, ircad17, tmp_path, capsys):
    liver, tumor = coarse_runs
    out = tmp_path / "pred"
    status = predict.main(["--liver", str(liver), "--tumor", str(tumor), "-i", str(ircad17), "-o", str(out),
                           "--png", "--no-progress"])
    assert status == 0, capsys.readouterr().err
    seg = out / "segmentation-17.nii.gz"  # the LiTS name of volume-17
    pred = assert_same_grid(seg, ircad17 / "volume-17.nii.gz")
    record = read_timings(seg)
    assert record["liver_found"] and record["tumor_windows"] > 0
    assert record["input_shape"] == [119, 512, 512] and record["preprocessed_shape"][0] == 40
    assert record["label_voxels"]["liver"] == int((pred >= 1).sum())
    assert record["run"]["settings"]["liver"]["deploy"] is True
    assert (out / "segmentation-17.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    assert evaluate.main(["--pred", str(out), "--gt", str(ircad17)]) == 0
    printed = capsys.readouterr().out
    with open(out / "evaluation.csv") as f:
        (row,) = list(csv.DictReader(f))
    truth = np.asarray(nib.load(ircad17 / "segmentation-17.nii.gz").dataobj)
    for name, a, b in (("liver", pred >= 1, truth >= 1), ("tumor", pred == 2, truth == 2)):
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert float(row[f"{name}_dice"]) == pytest.approx(dice, rel=1e-9)
        for metric in ("iou", "precision", "recall", "rvd", "asd", "hd95"):
            assert f"{name}_{metric}" in row
    assert int(row["lesions_n_true"]) == 2  # patient 1.17 has two tumours
    report = json.loads((out / "evaluation.json").read_text())
    assert report["summary"]["liver"]["dice"]["mean"] == pytest.approx(float(row["liver_dice"]))
    assert report["summary"]["tumor_size"]["groups"]
    for heading in ("Liver, per case", "Tumour, per case", "Summary", "Lesion detection", "Tumour size"):
        assert heading in printed
    assert printed.count("| volume-17 |") == 2


@pytest.mark.real_data
def test_small_ct_thinner_than_a_window_keeps_its_geometry(default_runs, shared_data, tmp_path, capsys):
    src = shared_data / "totalsegmentator-example" / "example_ct_sm.nii.gz"
    if not src.is_file():
        pytest.skip(f"{src} is absent")
    liver, tumor = default_runs
    out = tmp_path / "out" / "small.nii.gz"  # a file name as output, in a folder that does not exist
    status = predict.main(["--liver", str(liver), "--tumor", str(tumor), "-i", str(src), "-o", str(out),
                           "--no-progress"])
    assert status == 0, capsys.readouterr().err
    assert_same_grid(out, src)
    record = read_timings(out)
    assert record["preprocessed_shape"][0] == 30 < 32  # 30 slices, window depth 32: padded
    assert record["liver_windows"] >= 1


def ct_file(path, data, spacing=(1.5, 1.5, 2.5)):
    img = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    nib.save(img, path)
    return path


def small_ct():
    ct = np.full((40, 40, 20), -1000.0, np.float32)
    ct[4:36, 6:34, 2:18] = 40.0
    ct[10:24, 10:26, 5:14] = 120.0
    return ct


def test_corrupt_and_nan_inputs_fail_naming_the_file_and_leave_nothing(default_runs, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = ct_file(inputs / "good.nii.gz", small_ct())
    data = good.read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    with_nan = small_ct()
    with_nan[20, 20, 10] = np.nan
    ct_file(inputs / "with_nan.nii.gz", with_nan)
    out = tmp_path / "out"
    liver, tumor = default_runs
    status = predict.main(["--liver", str(liver), "--tumor", str(tumor), "-i", str(inputs), "-o", str(out),
                           "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    assert "truncated.nii.gz" in err and "corrupt" in err
    assert "with_nan.nii.gz" in err and "NaN" in err
    assert "2 of 3 case(s) failed" in err
    # Only the good case has outputs; no temporary or partial files are left anywhere.
    assert sorted(p.name for p in out.iterdir()) == ["good_seg.nii.gz", "good_seg_timings.json"]
    assert_same_grid(out / "good_seg.nii.gz", good)


def test_output_that_would_overwrite_an_input_is_refused(tmp_path, capsys):
    ct_file(tmp_path / "volume-1.nii.gz", small_ct())
    seg = tmp_path / "segmentation-1.nii.gz"
    ct_file(seg, np.zeros((40, 40, 20), np.uint8))
    before = seg.read_bytes()
    status = predict.main(["--liver", str(tmp_path / "no_run"), "-i", str(tmp_path), "-o", str(tmp_path)])
    assert status == 1
    assert "overwrite an input" in capsys.readouterr().err
    assert seg.read_bytes() == before


def test_missing_input_and_missing_checkpoint_are_clear_errors(tmp_path, capsys):
    assert predict.main(["--liver", str(tmp_path), "-i", str(tmp_path / "nope.nii.gz"), "-o", "x"]) == 1
    assert "nope.nii.gz: input does not exist" in capsys.readouterr().err
    ct = ct_file(tmp_path / "ct.nii.gz", small_ct())
    assert predict.main(["--liver", str(tmp_path / "run"), "-i", str(ct), "-o", str(tmp_path / "o")]) == 1
    assert "run: run directory does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("module", [predict, evaluate, visualize])
def test_each_cli_prints_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert f"python -m livseg_jax.{module.__name__.split('.')[-1]}" in capsys.readouterr().out


def test_stage_model_configs_skip_what_the_loader_will_report(tmp_path):
    for name, forms in (("a", REFERENCE_FORMS), ("b", {"depthwise_impl": "auto"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model": forms}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    got = predict.stage_model_configs([tmp_path / "a", None, tmp_path / "missing", tmp_path / "broken",
                                       tmp_path / "b"])
    assert [m.to_dict() for m in got] == [REFERENCE_FORMS, {"depthwise_impl": "auto"}]
    # The flags come from the forms of either stage, not from the configs' train sections.
    assert model_xla_flags(got[:1]) == "" and model_xla_flags(got) == GPU_FORM_FLAGS


def test_predict_applies_the_forms_xla_flags_before_jax_starts(tmp_path, capsys):
    dump = tmp_path / "dump"
    pre = dict(inplane_factor=8, target_slice_spacing=4.8)
    run = write_run(tmp_path / "liver", "liver", 0, **pre)  # computation forms "auto"
    ct = ct_file(tmp_path / "ct.nii.gz", small_ct())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", LIVSEG_COMPILATION_CACHE="off")
    # A fresh process in which the forms' flags are --xla_dump_to: XLA dumps only if they were set
    # before its backend started.
    script = (f"import sys, livseg_jax.xla_flags as f; f.GPU_FORM_FLAGS = {f'--xla_dump_to={dump}'!r}; "
              f"from livseg_jax import predict; sys.exit(predict.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "--liver", str(run), "-i", str(ct),
                           "-o", str(tmp_path / "out"), "--no-progress"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(dump.glob("*.txt")), "XLA did not see the flags of the checkpoint's computation forms"
    # In a process whose backend already runs, the flags cannot apply: a warning, and the
    # prediction (which does not depend on them) still runs.
    assert predict.main(["--liver", str(run), "-i", str(ct), "-o", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert "computation forms are not applied" in capsys.readouterr().err
    assert (tmp_path / "out2" / "ct_seg.nii.gz").exists()


def test_case_bar_starts_with_the_first_stages_windows_not_empty(capsys):
    progress = predict.CaseProgress("volume-0", enabled=True)
    progress("liver", 5)(5)
    progress("tumour", 3)(3)
    progress.close()
    err = capsys.readouterr().err
    frames = [f.strip() for f in err.split("\r") if f.strip()]
    assert frames[0].startswith("volume-0 [liver]:") and "0/5" in frames[0], frames  # not an empty "0win"
    assert any(f.startswith("volume-0 [tumour]:") for f in frames), frames
    assert "8/8" in err and progress.bar.total == 8
