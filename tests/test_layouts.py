"""Dataset discovery: LiTS, MSD and list layouts, automatic detection, deterministic order."""

import json
import pathlib

import pytest

from livseg_jax.data.layouts import CaseFiles, discover, find_inputs, plan_outputs, prediction_files, truth_files
from livseg_jax.data.nifti import DataError


def _touch(path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_lits_finds_nested_batches_in_natural_order_with_unlabelled_volumes(tmp_path):
    for n in (10, 2, 1):
        _touch(tmp_path / "Training Batch 1" / f"volume-{n}.nii")
        _touch(tmp_path / "Training Batch 2" / f"segmentation-{n}.nii.gz")
    _touch(tmp_path / "test" / "volume-30.nii.gz")  # test volume: no segmentation
    _touch(tmp_path / "Training Batch 1" / "._volume-5.nii")  # macOS resource file
    _touch(tmp_path / "notes.txt")
    cases = discover(tmp_path)
    assert [c.case_id for c in cases] == ["volume-1", "volume-2", "volume-10", "volume-30"]
    assert cases[2] == CaseFiles(
        "volume-10",
        tmp_path / "Training Batch 1" / "volume-10.nii",
        tmp_path / "Training Batch 2" / "segmentation-10.nii.gz",
    )
    assert cases[3].label is None
    assert discover(tmp_path, layout="lits") == cases


def test_lits_segmentation_without_volume_is_an_error(tmp_path):
    _touch(tmp_path / "volume-1.nii")
    _touch(tmp_path / "segmentation-1.nii")
    _touch(tmp_path / "segmentation-4.nii")
    with pytest.raises(DataError, match=r"segmentation-4\.nii: segmentation without"):
        discover(tmp_path)


def test_lits_duplicate_case_number_is_an_error(tmp_path):
    _touch(tmp_path / "a" / "volume-1.nii")
    _touch(tmp_path / "b" / "volume-1.nii.gz")
    with pytest.raises(DataError, match="case 1 appears twice"):
        discover(tmp_path, layout="lits")


def test_msd_reads_dataset_json_training_list(tmp_path):
    training = []
    for n in (11, 3):
        training.append({"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz"})
        _touch(tmp_path / "imagesTr" / f"liver_{n}.nii.gz")
        _touch(tmp_path / "labelsTr" / f"liver_{n}.nii.gz")
    _touch(tmp_path / "imagesTr" / "._liver_3.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"training": training, "test": []}))
    cases = discover(tmp_path)
    assert [c.case_id for c in cases] == ["liver_3", "liver_11"]
    assert cases[0].label == tmp_path / "./labelsTr/liver_3.nii.gz"


def test_msd_missing_listed_file_error_names_dataset_json(tmp_path):
    _touch(tmp_path / "imagesTr" / "liver_0.nii.gz")
    entry = {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [entry]}))
    with pytest.raises(DataError, match=r"dataset\.json: listed file .*labelsTr/liver_0"):
        discover(tmp_path, layout="msd")


def test_msd_without_dataset_json_pairs_images_and_labels_by_name(tmp_path):
    _touch(tmp_path / "imagesTr" / "liver_1.nii.gz")
    _touch(tmp_path / "imagesTr" / "liver_0.nii.gz")
    _touch(tmp_path / "labelsTr" / "liver_0.nii.gz")
    cases = discover(tmp_path)
    assert [(c.case_id, c.label is not None) for c in cases] == [("liver_0", True), ("liver_1", False)]


def test_list_file_resolves_relative_paths_and_skips_comments(tmp_path):
    data = tmp_path / "data"
    _touch(data / "my scan.nii.gz")
    _touch(data / "seg a.nii.gz")
    _touch(data / "b.nii")
    lst = data / "cases.txt"
    lst.write_text("# my cases\n\n'my scan.nii.gz' 'seg a.nii.gz'\nb.nii  # unlabelled\n")
    cases = discover("", layout="list", list_file=lst)
    assert cases == [
        CaseFiles("b", data / "b.nii", None),
        CaseFiles("my scan", data / "my scan.nii.gz", data / "seg a.nii.gz"),
    ]
    # A relative list file is looked up under the root; auto picks "list" when a file is given.
    assert discover(data, layout="auto", list_file="cases.txt") == cases


def test_list_file_missing_image_error_names_line(tmp_path):
    lst = tmp_path / "cases.txt"
    lst.write_text("\nmissing.nii.gz\n")
    with pytest.raises(DataError, match=r"cases\.txt:2: listed file .*missing\.nii\.gz"):
        discover(tmp_path, layout="list", list_file=lst)


def test_unknown_folder_layout_is_an_error_naming_it(tmp_path):
    _touch(tmp_path / "scan.nii.gz")
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        discover(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "absent", layout="lits")


def test_inputs_are_a_file_a_lits_folder_or_a_folders_nifti_files(tmp_path):
    lits, plain = tmp_path / "lits", tmp_path / "plain"
    for name in ("b/volume-10.nii.gz", "a/volume-2.nii", "a/segmentation-2.nii"):
        _touch(lits / name)
    for name in ("ct10.nii.gz", "ct2.nii", "._ct2.nii", "notes.txt"):
        _touch(plain / name)
    assert [(c.case_id, c.label is not None) for c in find_inputs(lits)] == [("volume-2", True), ("volume-10", False)]
    assert [c.image.name for c in find_inputs(plain)] == ["ct2.nii", "ct10.nii.gz"]
    assert find_inputs(plain / "ct2.nii") == [CaseFiles("ct2", plain / "ct2.nii")]
    with pytest.raises(DataError, match="not a NIfTI file"):
        find_inputs(plain / "notes.txt")
    with pytest.raises(DataError, match="input does not exist"):
        find_inputs(tmp_path / "absent")
    with pytest.raises(DataError, match="no .nii or .nii.gz images"):
        find_inputs(_touch(tmp_path / "empty" / "notes.txt").parent)


def test_outputs_are_named_per_case_and_never_overwrite_an_input(tmp_path):
    cases = [CaseFiles("volume-3", tmp_path / "volume-3.nii"), CaseFiles("ct", tmp_path / "ct.nii.gz")]
    jobs = plan_outputs(cases, tmp_path / "out")
    assert [out.name for _, out in jobs] == ["segmentation-3.nii.gz", "ct_seg.nii.gz"]
    assert plan_outputs(cases[:1], tmp_path / "x.nii.gz") == [(cases[0], tmp_path / "x.nii.gz")]
    with pytest.raises(ValueError, match="exactly one input"):
        plan_outputs(cases, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="overwrite an input"):
        plan_outputs([CaseFiles("x", tmp_path / "x_seg.nii.gz")], tmp_path)


def test_predictions_and_truths_are_keyed_by_case_in_natural_order(tmp_path):
    for name in ("pred/segmentation-10.nii.gz", "pred/segmentation-2.nii.gz", "gt/volume-2.nii",
                 "gt/segmentation-2.nii", "gt/volume-10.nii", "gt/segmentation-10.nii", "plain/ct_seg.nii.gz"):
        _touch(tmp_path / name)
    preds = prediction_files(tmp_path / "pred")
    assert list(preds) == ["volume-2", "volume-10"]
    truths = truth_files(tmp_path / "gt")  # a LiTS folder: its segmentations, not its volumes
    assert {k: p.name for k, p in truths.items()} == {"volume-2": "segmentation-2.nii",
                                                      "volume-10": "segmentation-10.nii"}
    assert truth_files(tmp_path / "plain") == {"ct": tmp_path / "plain" / "ct_seg.nii.gz"}
    _touch(tmp_path / "pred" / "volume-2.nii.gz")
    with pytest.raises(DataError, match="two files belong to case 'volume-2'"):
        prediction_files(tmp_path / "pred")
    with pytest.raises(DataError, match="prediction file or folder does not exist"):
        prediction_files(tmp_path / "absent")


@pytest.mark.parametrize("layout", ["nnunet", "msd"])
def test_auto_discovery_parses_dataset_json_once(layout, tmp_path, monkeypatch):
    """Layout detection hands its parsed dataset.json on to discovery instead of reading it again."""
    import types

    from livseg_jax.data import layouts

    _touch(tmp_path / "imagesTr" / "a_0000.nii.gz")
    _touch(tmp_path / "labelsTr" / "a.nii.gz")
    labels = {"background": 0, "liver": 2, "tumour": 1}
    meta = ({"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"} if layout == "nnunet" else
            {"labels": {"0": "background", "1": "tumour", "2": "liver"},
             "training": [{"image": "./imagesTr/a_0000.nii.gz", "label": "./labelsTr/a.nii.gz"}]})
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    parsed = []
    monkeypatch.setattr(layouts, "json", types.SimpleNamespace(loads=lambda text: parsed.append(text) or
                                                               json.loads(text)))
    cases = discover(tmp_path)
    assert [(c.case_id, c.label_map) for c in cases] == [("a" if layout == "nnunet" else "a_0000",
                                                          ((0, 0), (1, 2), (2, 1)))]
    assert len(parsed) == 1


def test_nnunet_test_images_predict_to_names_that_pair_with_labels_ts(tmp_path):
    # docs/own_data.md: predict -i <dataset>/imagesTs, then evaluate --gt <dataset>/labelsTs.
    for case in ("liver_7", "liver_12"):
        _touch(tmp_path / "Dataset001_Liver" / "imagesTs" / f"{case}_0000.nii.gz")
        _touch(tmp_path / "Dataset001_Liver" / "labelsTs" / f"{case}.nii.gz")
    cases = find_inputs(tmp_path / "Dataset001_Liver" / "imagesTs")
    assert [c.case_id for c in cases] == ["liver_7", "liver_12"]
    outputs = [out for _, out in plan_outputs(cases, tmp_path / "preds")]
    assert [p.name for p in outputs] == ["liver_7_seg.nii.gz", "liver_12_seg.nii.gz"]
    for out in outputs:
        _touch(out)
    truths = truth_files(tmp_path / "Dataset001_Liver" / "labelsTs")
    assert prediction_files(tmp_path / "preds").keys() == truths.keys() == {"liver_7", "liver_12"}
