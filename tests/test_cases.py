"""Case names: case ids of files, the pairing key, natural order, output and sidecar names."""

import pathlib

from livseg_jax.data import cases


def test_case_id_drops_the_nifti_ending_only():
    assert cases.case_id_of("a/b/volume-3.nii.gz") == "volume-3"
    assert cases.case_id_of(pathlib.Path("liver_1.nii")) == "liver_1"
    assert cases.case_id_of("scan.nii.gz.bak") == "scan.nii.gz.bak"


def test_case_keys_pair_lits_and_predict_names():
    assert cases.case_key("x/segmentation-007.nii.gz") == "volume-7"
    assert cases.case_key("volume-7.nii") == "volume-7"
    assert cases.case_key("liver_3_seg.nii.gz") == "liver_3"
    assert cases.case_key("liver_3.nii.gz") == "liver_3"


def test_output_names_follow_lits_or_add_seg():
    assert cases.output_name("volume-17") == "segmentation-17.nii.gz"
    assert cases.output_name("example_ct_sm") == "example_ct_sm_seg.nii.gz"
    assert cases.output_name("volume-x") == "volume-x_seg.nii.gz"


def test_a_prediction_pairs_back_with_its_case():
    for case_id in ("volume-17", "example_ct_sm", "volume-x"):
        assert cases.case_key(cases.output_name(case_id)) == case_id


def test_sidecars_sit_beside_the_label_map_without_its_ending():
    out = pathlib.Path("o/segmentation-3.nii.gz")
    assert cases.sidecar_path(out, "_timings.json") == pathlib.Path("o/segmentation-3_timings.json")
    assert cases.sidecar_path("o/x_seg.nii", ".png") == pathlib.Path("o/x_seg.png")


def test_natural_order_and_visible_nifti_files(tmp_path):
    names = ["volume-10.nii", "volume-2.nii.gz", "volume-1.nii"]
    assert sorted(names, key=cases.natural_key) == ["volume-1.nii", "volume-2.nii.gz", "volume-10.nii"]
    for name in ("a.nii", "b.nii.gz", "._a.nii", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.nii").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir() if cases.is_nifti_file(p)) == ["a.nii", "b.nii.gz"]
