"""Dataset discovery: LiTS, MSD and list layouts, automatic detection, deterministic order."""

import json
import pathlib

import pytest

from livseg_jax.data.layouts import CaseFiles, discover
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
