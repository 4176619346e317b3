"""Studies: splits, configs, tables, and the ablation study end to end at smoke scale (resumed after a crash)."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import pytest

from livseg_jax import evaluate
from livseg_jax.study import runner, spec, splits, tables
from livseg_jax.training.loop import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDIES = ("ablation", "losses", "tumor_size", "comparison", "stages")


# ---------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_three_to_one_and_disjoint():
    ids = [f"volume-{i}" for i in range(131)]
    a = splits.make_split(ids, test_cases=20, val_fraction=0.25, seed=3)
    b = splits.make_split(list(reversed(ids)), test_cases=20, val_fraction=0.25, seed=3)
    assert a == b  # the order the cases were found in does not matter
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (83, 28, 20)
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(ids)
    assert splits.make_split(ids, 20, 0.25, seed=4)["test"] != a["test"]


def test_k_fold_validation_folds_cover_train_and_validation_once_with_a_fixed_test_split():
    ids = [f"c{i}" for i in range(23)]
    folds = [splits.make_split(ids, 3, folds=4, fold=k, seed=1) for k in range(4)]
    assert all(f["test"] == folds[0]["test"] for f in folds)
    vals = [v for f in folds for v in f["val"]]
    assert sorted(vals) == sorted(folds[0]["train"] + folds[0]["val"])
    assert {len(f["val"]) for f in folds} == {5}
    with pytest.raises(ValueError, match="split.folds"):
        splits.make_split(ids, 3, folds=4, fold=4)


def test_saved_split_is_reused_and_a_changed_one_refused(tmp_path):
    settings = {"test_cases": 2, "val_fraction": 0.25, "folds": 0, "fold": 0, "seed": 0}
    ids = [f"volume-{i}" for i in range(8)]
    first = splits.load_or_create(tmp_path, ids, settings)
    assert splits.load_or_create(tmp_path, ids, settings) == first
    with pytest.raises(ValueError, match="split.json.*settings.*new --workdir"):
        splits.load_or_create(tmp_path, ids, {**settings, "seed": 1})
    with pytest.raises(ValueError, match="cases"):
        splits.load_or_create(tmp_path, ids[:-1], settings)


# ---------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", STUDIES)
@pytest.mark.parametrize("scale", ["", "demo", "paper"])
def test_shipped_studies_are_valid_and_build_every_stage_config(name, scale):
    study = spec.load_config_file(REPO / "configs" / "studies" / f"{name}.py", scale)
    spec.check_study(study, tables.METRIC_KEYS)
    split = {"train": ("volume-1", "volume-2"), "val": ("volume-3",)}
    for entry in study.runs:
        configs = runner.stage_configs(study, entry, split)
        assert set(configs) == set(spec.run_stages(entry))
        for stage, config in configs.items():
            assert config.stage == stage and config.data.root == study.data.root
            assert config.data.train_cases == split["train"] and config.data.val_cases == split["val"]
            if stage == "joint":
                assert config.model.num_classes == 3
    assert study.scale == (scale or "smoke")


def test_published_numbers_are_those_of_the_issue():
    ablation = spec.load_config_file(REPO / "configs" / "studies" / "ablation.py")
    published = {(t["id"], c["key"]): c["published"] for t in ablation.tables for c in t["columns"]}
    assert published[("table3", "liver.dice")] == {"UNet": 0.937, "MSCA-UNet": 0.946, "ELANRes-MSCA-UNet": 0.972}
    assert published[("table4", "tumor.rvd")] == {}


def test_bad_study_declarations_name_the_setting():
    study = spec.load_config_file(REPO / "configs" / "studies" / "losses.py")
    with pytest.raises(ValueError, match="unknown scale"):
        spec.parse_scale("huge", "configs/studies/losses.py")
    entry = spec.run("x", "two_stage", {"model.nmae": "unet"})
    with pytest.raises(ValueError, match="run 'x'.*model.nmae"):
        spec.stage_run_config(study, entry, "liver", {"train": ("a",), "val": ()})
    with pytest.raises(ValueError, match="no 'joint' stage"):
        spec.check_study(_with(study, runs=(spec.run("x", "two_stage", joint={"seed": 1}),), tables=()),
                         tables.METRIC_KEYS)
    bad_table = spec.table("t", "T", ("Dice",), (spec.column("c", "liver.dcie"),))
    with pytest.raises(ValueError, match="unknown metric 'liver.dcie'"):
        spec.check_study(_with(study, tables=(bad_table,)), tables.METRIC_KEYS)


def _with(study, **fields):
    study = study.copy_and_resolve_references()
    for k, v in fields.items():
        study[k] = v
    return study


def test_markdown_keeps_published_values_as_given_and_leaves_missing_cells_empty():
    spec_table = spec.table("t", "T", ("A", "B"), (spec.column("liver Dice", "liver.dice", 3, {"B": 0.97}),))
    text = tables.markdown_table(spec_table, {"A": {"liver.dice": 0.5}})
    assert "| A | 0.500 |  |" in text
    assert "| B (not run) |  | 0.970 |" in text  # as published, at the column's digits
    study = spec.load_config_file(REPO / "configs" / "studies" / "losses.py")
    too_fine = spec.table("t", "T", ("Dice",), (spec.column("liver Dice", "liver.dice", 2, {"Dice": 0.951}),))
    with pytest.raises(ValueError, match="more than the column's 2 digits"):
        spec.check_study(_with(study, tables=(too_fine,)), tables.METRIC_KEYS)


# --------------------------------------------------------- a run reads the study's dataset as training does

TINY_LABEL_MAP = "liver=liver,tumour=tumour,vessel=liver"
Z_SPACINGS = (2.0, 3.0, 2.5, 3.5)  # per case: the median spacing depends on which cases train


def _tiny_nnunet_dataset(root: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
    """Writes an nnU-Net v2 raw dataset of 4 synthetic phantoms whose label values need data.label_map:
    tumour 1, liver 2 and "vessel" 3 (a slab of the liver), each case with its own slice spacing."""
    import nibabel as nib
    import numpy as np

    from livseg_jax.data.synthetic import write_synthetic_dataset

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, z in zip(write_synthetic_dataset(cache, 4, (48, 48, 24), (1.5, 1.5, 2.0), seed=3), Z_SPACINGS,
                       strict=True):
        image, label = nib.load(case.image), np.asarray(nib.load(case.label).dataobj)
        affine = np.diag([1.5, 1.5, z, 1.0])
        values = np.choose(label, [0, 2, 1]).astype(np.uint8)  # liver 2, tumour 1
        values[:, :, :8][values[:, :, :8] == 2] = 3  # the lowest slices' liver: "vessel"
        n = case.case_id.split("-")[1]
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), root / "imagesTr" / f"tiny_{n}_0000.nii.gz")
        nib.save(nib.Nifti1Image(values, affine), root / "labelsTr" / f"tiny_{n}.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1, "liver": 2, "vessel": 3},
            "numTraining": 4, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.filterwarnings("ignore:.*found no liver")
def test_study_runs_read_the_datasets_label_map_and_share_one_median_spacing(tmp_path, monkeypatch):
    """The parent of a study resolves the median spacing once; the worker's run trains on the
    split's cases read as `livseg_jax.train` reads them, nnU-Net labels remapped by data.label_map."""
    import jax
    import numpy as np

    from livseg_jax.data import folds, spacing
    from livseg_jax.models import build_model, variable_shapes
    from livseg_jax.run_dir import write_variables
    from livseg_jax.training import loop

    study = spec.study_config("tiny", "", "tiny.py")
    study.data.root = str(_tiny_nnunet_dataset(tmp_path / "Dataset001_Tiny", tmp_path / "phantoms"))
    study.data.label_map, study.data.cache_dir = TINY_LABEL_MAP, str(tmp_path / "cache")
    study.split.test_cases = 1
    study.runs = (spec.run("J", "one_stage", {"model.name": "unet", "model.features": (4, 8),
                                              "data.patch_size": (16, 16, 16), "preprocess.spacing_mode": "median"}),)
    study.tables = (spec.table("t", "T", ("J",), (spec.column("liver Dice", "liver.dice"),)),)
    reads = []
    header_grid = spacing.header_grid
    monkeypatch.setattr(spacing, "header_grid", lambda path: reads.append(path) or header_grid(path))

    workdir = tmp_path / "study"
    cases, split, out, median = runner.prepare(study, workdir)  # as the parent of worker processes does
    runner.prepare_caches(study, split, median)
    assert len(reads) == len(split["train"]) == 2  # each training case's header, once
    z = np.median([Z_SPACINGS[int(c.split("_")[1])] for c in split["train"]])
    assert median == pytest.approx((z, 1.5, 1.5))

    seen = {}

    def data_only(config, stage_dir, devices):  # train_and_evaluate's data path, constant weights for the rest
        shapes = variable_shapes(build_model(config.model, deploy=False), tuple(config.data.patch_size))
        write_variables(stage_dir, jax.tree.map(lambda a: np.full(a.shape, 0.01, a.dtype), shapes), config, force=True)
        train, val = loop.split_case_files(config, stage_dir)
        seen[stage_dir.name] = (config, loop.cache_stage_cases(config, train, val))
        return {"final_step": 0, "start_step": 0, "best_dice": 0.0}

    runner.run_worker(study, workdir, ["J"], train_fn=data_only)
    assert len(reads) == 2  # the worker read no header again
    config, cached = seen["joint"]
    assert config.data.label_map == TINY_LABEL_MAP and config.data.layout == "auto"
    assert config.preprocess.spacing_mode == "target" and tuple(config.preprocess.target_spacing) == median
    saved = folds.read_split(workdir / "runs" / "J" / "joint")
    assert (saved["train"], saved["val"]) == (split["train"], split["val"])
    assert sorted(c.case_id for c in cached) == sorted(split["train"] + split["val"])
    for case in cached:  # remapped: no "vessel" value, tumour (2) a small part of the liver (1)
        counts = np.bincount(np.asarray(case.label).ravel(), minlength=3)
        assert len(counts) == 3 and 0 < counts[2] < counts[1], (case.case_id, counts)
    assert (workdir / "runs" / "J" / runner.RESULT_FILE).is_file()  # the test case predicted and evaluated


def test_a_stage_finished_through_the_former_training_list_is_kept_only_for_the_same_run_on_the_same_cases(
        tmp_path):
    import dataclasses

    from livseg_jax import atomic_write
    from livseg_jax.data.layouts import CaseFiles

    study = spec.load_config_file(REPO / "configs" / "studies" / "ablation.py")
    split = {"train": ["volume-2", "volume-0"], "val": ["volume-5"]}
    config = runner.stage_configs(study, study.runs[0], split)["liver"]
    listed = tmp_path / runner.LEGACY_LIST
    listed.write_text("".join(f"train_list/{p}-{c}.nii.gz train_list/{p}-{c}_label.nii.gz\n"
                              for p, ids in (("t", split["train"]), ("v", split["val"])) for c in ids))
    old = json.loads(config.to_json_best_effort())  # as the study wrote it before runs got case ids
    for key in ("train_cases", "val_cases"):
        del old["data"][key]
    old["data"].update(root="", layout="list", list_file=str(listed), num_val_cases=1)
    stage = tmp_path / "runs" / "UNet" / "liver"
    record = {"config": old, "final_step": 2, "start_step": 0, "best_dice": 0.0, "train_s": 1.0,
              "finished": "2026-11-30T00:00:00Z"}
    atomic_write.write_json(stage / runner.DONE_FILE, record)
    plain = {c: CaseFiles(c, tmp_path / f"{c}.nii.gz", tmp_path / f"{c}_seg.nii.gz") for c in ("volume-0", "volume-2",
                                                                                              "volume-5")}
    remapped = {c: dataclasses.replace(f, label_map=((0, 0), (1, 2), (2, 1))) for c, f in plain.items()}
    other_seed = config.copy_and_resolve_references()
    other_seed.seed = 7

    assert not runner.adopt_listed_stage(stage, config, split, remapped)  # the list read raw labels
    assert not runner.adopt_listed_stage(stage, config, {**split, "train": split["train"][::-1]}, plain)
    assert not runner.adopt_listed_stage(stage, other_seed, split, plain)  # another run
    with pytest.raises(ValueError, match="finished training with another config"):
        runner.train_stage(config, stage, [], train_fn=lambda *args: pytest.fail("trained"))
    assert runner.adopt_listed_stage(stage, config, split, plain)
    done = runner.train_stage(config, stage, [], train_fn=lambda *args: pytest.fail("trained again"))
    assert done["finished"] == record["finished"] and done["adopted"]["list_file"] == str(listed)


# ------------------------------------------------------------------------------ end to end (slow)


class SimulatedKill(RuntimeError):
    pass


@pytest.fixture
def compilation_cache(tmp_path):
    """JAX's persistent compilation cache on, as `python -m livseg_jax.study` turns it on, for one test."""
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    from livseg_jax.compilation_cache import enable_compilation_cache

    assert jax.config.jax_compilation_cache_dir is None  # the tests' default
    try:
        yield enable_compilation_cache(tmp_path / "jax_compilation")
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax_cache.reset_cache()  # JAX reads the setting once: the next test starts without it


@pytest.mark.slow
def test_ablation_smoke_study_matches_evaluate_and_resumes_without_retraining(tmp_path, monkeypatch,
                                                                              compilation_cache):
    # Two of the four networks (`--runs`): the plain U-Net and the full one, which holds every unit
    # the other two combine (ELANRes, MSCA). All four took 117 s of the suite on the 2-core machine
    # (session 16). The tables keep every run's row; the other two stay empty.
    study = spec.load_config_file(REPO / "configs" / "studies" / "ablation.py")
    only = ("UNet", "ELANRes-MSCA-UNet")
    study.data.cache_dir = str(tmp_path / "cache")
    workdir = tmp_path / "study"
    trained = []

    def crash_at_second_run(config, stage_dir, devices):
        if stage_dir.parent.name == "ELANRes-MSCA-UNet":
            raise SimulatedKill("killed")
        trained.append((stage_dir.parent.name, stage_dir.name))
        return train_and_evaluate(config, stage_dir, devices)

    with pytest.raises(SimulatedKill):
        runner.run_study(study, workdir, only, train_fn=crash_at_second_run)
    assert trained == [("UNet", "liver"), ("UNet", "tumor")]
    assert (workdir / "runs" / "UNet" / "tumor" / runner.DONE_FILE).exists()
    assert not (workdir / "tables.md").exists()

    def record(config, stage_dir, devices):
        trained.append((stage_dir.parent.name, stage_dir.name))
        return train_and_evaluate(config, stage_dir, devices)

    out = runner.run_study(study, workdir, only, train_fn=record)
    assert trained[2:] == [("ELANRes-MSCA-UNet", s) for s in ("liver", "tumor")]  # UNet was not trained again
    assert out["figure"].is_file() and out["qualitative"].is_file()
    header = (workdir / "tables.md").read_text()
    assert "synthetic" in header and "smoke" in header and "commit:" in header and "device:" in header

    # The table's numbers are evaluate's on the same predictions (the command line, its own pairing).
    report = json.loads(out["tables"]["json"].read_text())
    cells = {t["id"]: {row["run"]: row for row in t["cells"]} for t in report["tables"]}
    split = json.loads((workdir / "split.json").read_text())
    gt_dir = pathlib.Path(runner.study_cases(study)[split["test"][0]].label).parent
    for name in ("UNet", "ELANRes-MSCA-UNet"):
        ev_dir = tmp_path / f"evaluate-{name}"
        assert evaluate.main(["--pred", str(workdir / "runs" / name / "predictions"), "--gt", str(gt_dir),
                              "--out", str(ev_dir)]) == 0
        ev = json.loads((ev_dir / "evaluation.json").read_text())
        assert [c["case_id"] for c in ev["cases"]] == split["test"]
        s = ev["summary"]
        for table_id, label, value in (("table3", "liver Dice", s["liver"]["dice"]["mean"]),
                                       ("table3", "liver ASD (mm)", s["liver"]["asd"]["mean"]),
                                       ("table4", "tumour Dice", s["tumor"]["dice"]["mean"]),
                                       ("table4", "tumour RVD", s["tumor"]["rvd"]["mean"]),
                                       ("table4", "tumour precision", s["tumor"]["precision"]["mean"])):
            ours = cells[table_id][name][label]
            assert (ours is None and value is None) or math.isclose(ours, value, rel_tol=0, abs_tol=0), \
                (name, label, ours, value)
    assert cells["table3"]["UNet"]["liver Dice (published)"] == 0.937
    assert cells["table3"]["ELANRes-UNet"]["liver Dice (published)"] is None
    assert cells["table3"]["ELANRes-MSCA-UNet"]["liver Dice (published)"] == 0.972
    assert cells["table4"]["UNet"]["tumour Dice (published)"] is None
    # Only the two selected runs have results: the others' rows are there and empty.
    assert {name for name, row in cells["table3"].items() if row["liver Dice"] is not None} == set(only)
    assert cells["table5"]["UNet"]["parameters (both stages)"] > 0

    # A third run trains nothing and predicts nothing: the tables come from the finished runs.
    trained.clear()
    mtime = (workdir / "runs" / "UNet" / "predictions.json").stat().st_mtime_ns
    runner.run_study(study, workdir, only, train_fn=record)
    assert trained == []
    assert (workdir / "runs" / "UNet" / "predictions.json").stat().st_mtime_ns == mtime


def test_command_line_refuses_an_unknown_scale():
    proc = subprocess.run([sys.executable, "-m", "livseg_jax.study", "--config=configs/studies/ablation.py:huge",
                           "--workdir=/nonexistent"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown scale 'huge'" in proc.stderr
