"""`python -m livseg_jax.evaluate` and `livseg_jax.visualize` on small synthetic label maps."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from livseg_jax import evaluate, metrics, visualize
from livseg_jax.data import nifti

SPACING = (0.8, 0.9, 2.0)  # on disk (x, y, z)
AFFINE = np.diag([*SPACING, 1.0])
SHAPE = (32, 30, 12)  # on disk (x, y, z)


def save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def truth_map(tumours=True):
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:26, 5:24, 2:10] = 1
    if tumours:
        lab[6:10, 7:11, 3:6] = 2
        lab[16:22, 14:20, 5:9] = 2
    return lab


def shifted(lab, dx):
    out = np.roll(lab, dx, axis=0)
    out[(out == 2) & (np.roll(lab >= 1, dx, axis=0) == 0)] = 1
    return out


@pytest.fixture
def lits(tmp_path):
    """A LiTS ground-truth folder with 2 cases (+ volumes) and a prediction folder for both."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    truths = {1: truth_map(), 2: truth_map(tumours=False)}
    p1 = shifted(truths[1], 2)
    p1[10:12, 18:20, 2:3] = 2  # a false-positive lesion, away from both true tumours
    preds = {1: p1, 2: shifted(truths[2], 1)}
    for n in (1, 2):
        save(gt / f"volume-{n}.nii.gz", np.where(truths[n] >= 1, 90, -1000).astype(np.int16))
        save(gt / f"segmentation-{n}.nii.gz", truths[n])
        save(pred / f"segmentation-{n}.nii.gz", preds[n])
    return gt, pred, truths, preds


def internal(lab):
    """Returns a disk-order (x, y, z) array in internal (z, y, x) order for this diagonal affine."""
    return lab.transpose(2, 1, 0)


def test_table_values_match_the_metrics_of_each_case(lits, tmp_path, capsys):
    gt, pred, truths, preds = lits
    out = tmp_path / "report"
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 0
    with open(out / "evaluation.csv") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["volume-1", "volume-2"]
    spacing = SPACING[::-1]  # internal (z, y, x)
    for n in (1, 2):
        p, t = internal(preds[n]), internal(truths[n])
        row = rows[f"volume-{n}"]
        for name, a, b in (("liver", p >= 1, t >= 1), ("tumor", p == 2, t == 2)):
            expected = metrics.binary_metrics(a, b, spacing)
            for k in metrics.METRIC_NAMES:
                if math.isnan(expected[k]):
                    assert row[f"{name}_{k}"] == "", (n, name, k)
                else:
                    # rel 1e-6: the files store the spacing as float32
                    assert float(row[f"{name}_{k}"]) == pytest.approx(expected[k], rel=1e-6), (n, name, k)
    lesions = metrics.lesion_detection(internal(preds[1]) == 2, internal(truths[1]) == 2, spacing)
    assert int(rows["volume-1"]["lesions_n_true"]) == lesions["n_true"] == 2
    assert int(rows["volume-1"]["lesions_n_false_positive"]) == lesions["n_false_positive"] == 1

    report = json.loads((out / "evaluation.json").read_text())
    dices = [float(rows[k]["liver_dice"]) for k in ("volume-1", "volume-2")]
    assert report["summary"]["liver"]["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert report["summary"]["liver"]["dice"]["std"] == pytest.approx(np.std(dices))
    inter = sum(int(rows[k]["liver_n_intersection"]) for k in rows)
    total = sum(int(rows[k]["liver_n_pred"]) + int(rows[k]["liver_n_truth"]) for k in rows)
    assert report["summary"]["liver"]["global_dice"] == pytest.approx(2 * inter / total)
    # Case 2 has no tumour in truth or prediction: perfect agreement by definition; the size study
    # leaves it out of both groups.
    assert report["summary"]["tumor_size"]["n_cases_without_tumor"] == 1
    assert report["summary"]["lesions"]["n_true"] == 2

    printed = capsys.readouterr().out
    assert "| volume-1 |" in printed and "| global Dice |" in printed
    assert "n/a" in printed  # the empty Dice<0.6 group of the size table
    assert "nan" not in printed.lower()


def test_undefined_metrics_are_null_in_json_and_blank_in_csv(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    save(gt / "a.nii.gz", truth_map())
    save(pred / "a_seg.nii.gz", truth_map(tumours=False))  # tumours missed: precision undefined
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt)]) == 0
    report = json.loads((pred / "evaluation.json").read_text())  # default --out: the prediction folder
    (case,) = report["cases"]
    assert case["case_id"] == "a"
    assert case["tumor"]["precision"] is None and case["tumor"]["asd"] is None
    assert case["tumor"]["dice"] == 0.0 and case["liver"]["dice"] == 1.0
    with open(pred / "evaluation.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["tumor_precision"] == "" and float(row["tumor_recall"]) == 0.0
    assert not [p for p in pred.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_prediction_without_ground_truth_is_an_error_and_extra_truth_a_warning(lits, capsys):
    gt, pred, *_ = lits
    (gt / "segmentation-2.nii.gz").unlink()
    (gt / "volume-2.nii.gz").unlink()
    save(gt / "segmentation-3.nii.gz", truth_map())
    save(gt / "volume-3.nii.gz", np.zeros(SHAPE, np.int16))
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt)]) == 1
    err = capsys.readouterr().err
    assert "no ground truth for predicted case(s) volume-2" in err
    assert not (pred / "evaluation.csv").exists()
    (pred / "segmentation-2.nii.gz").unlink()
    assert evaluate.main(["--pred", str(pred), "--gt", str(gt)]) == 0
    assert "case volume-3 has ground truth but no prediction" in capsys.readouterr().err
    report = json.loads((pred / "evaluation.json").read_text())
    assert [c["case_id"] for c in report["cases"]] == ["volume-1"]
    assert report["ground_truth_without_prediction"] == ["volume-3"]


def test_prediction_on_another_grid_is_refused_naming_the_file(tmp_path, capsys):
    gt = save(tmp_path / "case_gt.nii.gz", truth_map())
    moved = AFFINE.copy()
    moved[0, 3] = 5.0
    bad_affine = save(tmp_path / "case_seg.nii.gz", truth_map(), moved)
    assert evaluate.main(["--pred", str(bad_affine), "--gt", str(gt), "--out", str(tmp_path / "r")]) == 1
    assert "case_seg.nii.gz: label affine does not match" in capsys.readouterr().err
    bad_shape = save(tmp_path / "small_seg.nii.gz", truth_map()[:-1])
    assert evaluate.main(["--pred", str(bad_shape), "--gt", str(gt), "--out", str(tmp_path / "r")]) == 1
    assert "small_seg.nii.gz: label shape" in capsys.readouterr().err
    bad_values = save(tmp_path / "v_seg.nii.gz", truth_map() * 3)
    assert evaluate.main(["--pred", str(bad_values), "--gt", str(gt), "--out", str(tmp_path / "r")]) == 1
    assert "v_seg.nii.gz: label values outside" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------ pictures


def test_slices_are_chosen_where_liver_and_tumour_are_largest():
    lab = np.zeros((10, 12, 14), np.uint8)
    lab[2:8, 3:9, 2:12] = 1
    lab[6, 3:9, 2:12] = 1  # same liver area on every slice 2..7 ...
    lab[4, 2:10, 1:13] = 1  # ... except slice 4, which is larger
    lab[7, 4:6, 4:6] = 2
    panels = visualize.pick_slices(lab)
    assert panels[0][1:] == ("axial", 4)
    assert panels[1][1:] == ("axial", 7)
    assert panels[2][1] == "coronal" and 3 <= panels[2][2] < 9
    assert [p[1] for p in visualize.pick_slices(lab * 0)] == ["axial", "coronal"]


def test_visualize_cli_writes_one_png_per_case(lits, tmp_path, capsys):
    gt, pred, *_ = lits
    out = tmp_path / "png"
    assert visualize.main(["--image", str(gt), "--pred", str(pred), "--gt", str(gt), "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["volume-1.png", "volume-2.png"]
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlay_refuses_label_maps_of_another_shape():
    image = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="prediction shape"):
        visualize.render_overlay(image, (1, 1, 1), np.zeros((4, 8, 7), np.uint8))
    fig = visualize.render_overlay(image, (1, 1, 1), np.ones((4, 8, 8), np.uint8))
    assert len(fig.axes) == 2  # axial with most liver + coronal (no tumour panel)


def test_labels_read_back_in_internal_order_match_the_disk_transpose(tmp_path):
    # The metric spacing above assumes internal = disk.transpose(2, 1, 0) for a diagonal affine.
    path = save(tmp_path / "t.nii.gz", truth_map())
    labels, geometry = nifti.read_label(path)
    np.testing.assert_array_equal(labels, internal(truth_map()))
    np.testing.assert_allclose(geometry.spacing, SPACING[::-1])
