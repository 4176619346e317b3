"""Cross-validation folds (`data/folds.py`), the run's `splits.json`, and `evaluate --cv` over fold runs."""

import csv
import json

import jax
import numpy as np
import pytest

from livseg_jax import evaluate
from livseg_jax.config import base_config, model_config
from livseg_jax.config_checks import ConfigError, validate_config
from livseg_jax.data import folds
from livseg_jax.models import build_model, variable_shapes
from livseg_jax.run_dir import write_variables
from livseg_jax.study import splits as study_splits
from livseg_jax.training.loop import split_case_files, training_split

IDS = [f"case-{i}" for i in range(23)]


@pytest.mark.parametrize("k", [2, 5, 23])
def test_folds_are_disjoint_near_equal_and_cover_every_case_exactly_once(k):
    parts = folds.kfold(IDS, k, seed=7)
    assert len(parts) == k
    pooled = [c for part in parts for c in part]
    assert sorted(pooled) == sorted(IDS) and len(pooled) == len(set(pooled))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for fold in range(k):
        split = folds.make_training_split(IDS, k, fold, 7, num_val_cases=2)
        assert split["val"] == parts[fold]
        assert sorted(split["train"] + split["val"]) == sorted(IDS)
        assert not set(split["train"]) & set(split["val"])


def test_same_seed_gives_the_same_split_and_another_seed_another():
    assert folds.kfold(IDS, 5, seed=3) == folds.kfold(list(reversed(IDS)), 5, seed=3)  # input order is irrelevant
    assert folds.kfold(IDS, 5, seed=3) != folds.kfold(IDS, 5, seed=4)


def test_bad_fold_settings_are_refused():
    with pytest.raises(ValueError, match="num_folds = 24 with 23 cases"):
        folds.kfold(IDS, 24, 0)
    with pytest.raises(ValueError, match="data.fold = 5"):
        folds.make_training_split(IDS, 5, 5, 0, 2)
    with pytest.raises(ValueError, match="case ids repeat"):
        folds.kfold(IDS + IDS[:1], 2, 0)
    config = base_config()
    config.data.num_folds, config.data.fold = 3, 3
    with pytest.raises(ConfigError, match="data.fold"):
        validate_config(config)
    config.data.num_folds, config.data.fold = 1, 0
    with pytest.raises(ConfigError, match="data.num_folds"):
        validate_config(config)


def test_the_studys_k_fold_validation_is_the_shared_fold_rule():
    split = study_splits.make_split(IDS, test_cases=3, folds=4, fold=2, seed=5)
    order = folds.shuffled_cases(IDS, 5)
    assert split["test"] == sorted(order[:3], key=lambda c: int(c.split("-")[1]))
    assert split["val"] == folds.contiguous_folds(order[3:], 4)[2]


def test_splits_json_is_saved_reused_and_a_changed_split_is_refused(tmp_path):
    split = folds.make_training_split(IDS, 4, 1, 0, 2)
    assert folds.load_or_save_split(tmp_path, split) == split
    assert folds.read_split(tmp_path) == split
    assert folds.load_or_save_split(tmp_path, folds.make_training_split(IDS, 4, 1, 0, 2)) == split
    for other in (folds.make_training_split(IDS, 4, 2, 0, 2), folds.make_training_split(IDS, 4, 1, 9, 2),
                  folds.make_training_split(IDS[:-1], 4, 1, 0, 2), folds.make_training_split(IDS, 0, 0, 0, 2)):
        with pytest.raises(ValueError, match="trained on another split"):
            folds.load_or_save_split(tmp_path, other)


def tiny_config(cache_dir, num_folds=2, fold=0):
    c = base_config()
    c.model = model_config("unet")
    c.model.features = (4, 8)
    c.data.synthetic.num_cases = 4
    c.data.synthetic.shape = (48, 48, 16)
    c.data.synthetic.spacing = (2.0, 2.0, 4.0)
    c.data.patch_size = (16, 16, 16)
    c.data.cache_dir = str(cache_dir)
    c.data.num_folds, c.data.fold = num_folds, fold
    return c


@pytest.fixture(scope="module")
def cv_root(tmp_path_factory):
    """A 2-fold root of liver runs, each with the splits.json training would save: fold 0's network
    finds liver everywhere, fold 1's nowhere, so every case's score shows which run predicted it."""
    tmp = tmp_path_factory.mktemp("cv")
    root = tmp / "folds"
    for fold, bias in ((0, [-20.0, 20.0]), (1, [20.0, -20.0])):
        config = tiny_config(tmp / "cache", fold=fold)
        shapes = variable_shapes(build_model(config.model, deploy=False), (16, 16, 16))
        variables = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), shapes)
        variables["params"]["head0"]["bias"] = np.array(bias, np.float32)
        run = write_variables(root / f"fold-{fold}", variables, config)
        split_case_files(config, run)  # writes the run's splits.json, as train_and_evaluate does
    return root


def test_a_fold_run_trains_on_the_other_folds_and_validates_on_its_own(cv_root):
    config = tiny_config(cv_root.parent / "cache", fold=1)
    train, val = split_case_files(config, cv_root / "fold-1")  # checked against the saved file
    ids = [f"volume-{i}" for i in range(4)]
    assert [c.case_id for c in val] == folds.kfold(ids, 2, config.seed)[1]
    assert sorted(c.case_id for c in train + val) == ids
    assert training_split(config, ids) == folds.read_split(cv_root / "fold-1")
    config.seed = 1
    with pytest.raises(ValueError, match="splits.json: this run directory was trained on another split"):
        split_case_files(config, cv_root / "fold-1")


@pytest.mark.filterwarnings("ignore:.*found no liver")
def test_evaluate_cv_scores_every_case_once_with_its_folds_run(cv_root, capsys):
    assert evaluate.main(["--cv", str(cv_root)]) == 0
    out = cv_root / "cv"
    report = json.loads((out / "cv_evaluation.json").read_text())
    fold_val = {k: folds.read_split(cv_root / f"fold-{k}")["val"] for k in (0, 1)}
    assert [f["case_ids"] for f in report["folds"]] == [fold_val[0], fold_val[1]]
    assert sorted(c["case_id"] for c in report["cases"]) == [f"volume-{i}" for i in range(4)]
    assert report["structures"] == ["liver"] and "tumor" not in report["pooled"]
    # Each case was predicted by its own fold's run, and scores as evaluating that file alone does.
    for case in report["cases"]:
        pred = out / "predictions" / f"fold-{case['fold']}" / f"segmentation-{case['case_id'].split('-')[1]}.nii.gz"
        assert case["case_id"] in fold_val[case["fold"]] and case["pred"] == str(pred)
        alone = evaluate.evaluate_case(case["case_id"], pred, case["gt"])
        assert alone["liver"]["dice"] == pytest.approx(case["liver"]["dice"])
        assert (case["liver"]["dice"] > 0.01) == (case["fold"] == 0)  # liver everywhere vs nowhere
        assert case["liver"]["n_truth"] > 0
    pooled = report["pooled"]["liver"]
    assert pooled["n_cases"] == 4 and pooled["dice"]["n"] + pooled["dice"]["n_undefined"] == 4
    assert pooled["dice"]["mean"] == pytest.approx(sum(c["liver"]["dice"] for c in report["cases"]) / 4)
    assert report["folds"][1]["summary"]["liver"]["dice"]["mean"] == 0.0
    with open(out / "cv_evaluation.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["fold"]), r["case_id"]) for r in rows) == sorted(
        (k, c) for k in (0, 1) for c in fold_val[k])
    assert not any(name.startswith("tumor_") for name in rows[0])
    assert "pooled" in capsys.readouterr().out
    # A second call reads the predictions instead of predicting again.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "predictions").rglob("*.nii.gz")}
    assert evaluate.main(["--cv", str(cv_root)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "predictions").rglob("*.nii.gz")}



def _stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.nii.gz")}


@pytest.mark.filterwarnings("ignore:.*found no liver")
def test_evaluate_cv_predicts_again_only_when_the_predictions_came_from_other_checkpoints(cv_root, tmp_path,
                                                                                          capsys):
    import shutil

    from livseg_jax.run_dir import write_variables

    out = tmp_path / "cv"
    folders = [out / "predictions" / f"fold-{k}" for k in (0, 1)]
    assert evaluate.main(["--cv", str(cv_root), "--out", str(out)]) == 0
    made = json.loads((folders[0] / evaluate.CV_SOURCE).read_text())
    assert made["run"] == str((cv_root / "fold-0").resolve()) and made["checkpoint"] == "checkpoints/0"
    first = [_stamps(f) for f in folders]
    assert evaluate.main(["--cv", str(cv_root), "--out", str(out), "--which", "latest"]) == 0  # the same checkpoints
    assert [_stamps(f) for f in folders] == first and "predicting again" not in capsys.readouterr().err

    # Other fold runs into the same --out: every fold predicted again.
    other = tmp_path / "other"
    for k in (0, 1):
        shutil.copytree(cv_root / f"fold-{k}", other / f"fold-{k}")
    assert evaluate.main(["--cv", str(other), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert all(f"fold {k}: the 2 label map(s) in {folders[k]} were made from {(cv_root / f'fold-{k}').resolve()} "
               f"(checkpoints/0), not {(other / f'fold-{k}').resolve()} (checkpoints/0): predicting again" in err
               for k in (0, 1))
    second = [_stamps(f) for f in folders]
    assert all(second[k][name] != first[k][name] for k in (0, 1) for name in first[k])

    # Fold 0 retrained to the same step with another network (liver nowhere): only fold 0 predicted again.
    config = tiny_config(cv_root.parent / "cache", fold=0)
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype),
                             variable_shapes(build_model(config.model, deploy=False), (16, 16, 16)))
    variables["params"]["head0"]["bias"] = np.array([20.0, -20.0], np.float32)
    write_variables(other / "fold-0", variables, config, force=True)
    split_case_files(config, other / "fold-0")
    assert evaluate.main(["--cv", str(other), "--out", str(out)]) == 0
    assert "fold 0: the 2 label map(s)" in capsys.readouterr().err
    third = [_stamps(f) for f in folders]
    assert third[1] == second[1] and all(third[0][n] != second[0][n] for n in second[0])
    report = json.loads((out / "cv_evaluation.json").read_text())
    assert report["folds"][0]["summary"]["liver"]["dice"]["mean"] == 0.0  # scored with the new network

    # Label maps of unknown origin (no record: an older evaluate wrote them) are predicted again.
    (folders[1] / evaluate.CV_SOURCE).unlink()
    assert evaluate.main(["--cv", str(other), "--out", str(out)]) == 0
    assert f"no readable {evaluate.CV_SOURCE}" in capsys.readouterr().err
    assert all(_stamps(folders[1])[n] != third[1][n] for n in third[1]) and _stamps(folders[0]) == third[0]

def test_evaluate_cv_refuses_a_missing_or_repeated_fold(cv_root, tmp_path, capsys):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(cv_root / "fold-0", partial / "fold-0")
    assert evaluate.main(["--cv", str(partial)]) == 1
    assert "fold(s) 1 of 2 have no run directory" in capsys.readouterr().err
    shutil.copytree(cv_root / "fold-0", partial / "fold-0-again")
    assert evaluate.main(["--cv", str(partial)]) == 1
    assert "fold 0 is already given by" in capsys.readouterr().err
    assert evaluate.main(["--cv", str(partial), "--pred", "x"]) == 1
    assert "--cv cannot be used with --pred" in capsys.readouterr().err


def test_postprocess_chooses_on_the_fold_runs_validation_fold(tmp_path):
    from livseg_jax import postprocess
    from livseg_jax.run_dir import save_config

    ids = [f"ct{i}" for i in range(1, 6)]
    for cid in ids:
        (tmp_path / f"{cid}.nii.gz").touch()
        (tmp_path / f"{cid}_label.nii.gz").touch()
    (tmp_path / "cases.txt").write_text("".join(f"{c}.nii.gz {c}_label.nii.gz\n" for c in ids))
    config = base_config()
    config.data.layout, config.data.list_file = "list", str(tmp_path / "cases.txt")
    config.data.num_val_cases, config.data.num_folds, config.data.fold = 0, 3, 2
    save_config(tmp_path / "run", config)
    chosen = [c.case_id for c in postprocess.validation_files(tmp_path / "run", None)]
    assert chosen == folds.kfold(ids, 3, config.seed)[2]


def test_a_split_given_by_case_ids_trains_and_validates_on_exactly_those():
    config = base_config()
    config.data.train_cases, config.data.val_cases = ("case-3", "case-1"), ("case-10",)
    split = training_split(config, IDS)
    assert (split["train"], split["val"], split["cases"]) == (["case-3", "case-1"], ["case-10"],
                                                              ["case-1", "case-3", "case-10"])
    for train, val, num_folds, problem in ((("case-1",), ("case-99",), 0, "data.val_cases: case.s. case-99"),
                                           (("case-1",), ("case-1",), 0, "share case.s. case-1"),
                                           ((), ("case-1",), 0, "without data.train_cases"),
                                           (("case-1",), (), 3, "leave data.num_folds 0")):
        config.data.train_cases, config.data.val_cases, config.data.num_folds = train, val, num_folds
        with pytest.raises(ValueError, match=problem):
            training_split(config, IDS)
