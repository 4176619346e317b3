"""Datasets users have: nnU-Net v2 raw (label remapping) and CHAOS CT (DICOM + PNG masks), built
from a crop of the shared real 3D-IRCADb patient, discovered and trained for a few steps."""

import copy
import io
import json
import pathlib
import zipfile

import jax
import nibabel as nib
import numpy as np
import pytest

from livseg_jax.config import base_config
from livseg_jax.data import chaos, nifti
from livseg_jax.data.layouts import detect_layout, discover, find_inputs, truth_files
from livseg_jax.data.nifti import DataError
from livseg_jax.training import logging as run_logging
from livseg_jax.training.loop import train_and_evaluate

# The crops lie inside the liver: no air or fat, so their intensities do not look like a whole CT.
pytestmark = pytest.mark.filterwarnings("ignore::livseg_jax.data.nifti.HUWarning")
pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")

CROP = 40  # rows and columns kept around the liver
SLICES = 20


def _slices(zip_path: pathlib.Path, folder: str) -> list:
    """Returns the datasets of one folder of a 3D-IRCADb zip, sorted by position."""
    with zipfile.ZipFile(zip_path) as z:
        names = [n for n in z.namelist() if n.startswith(f"{folder}/image_")]
        datasets = [pydicom.dcmread(io.BytesIO(z.read(n))) for n in names]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def ircad_crop(shared_data):
    """Returns (cropped CT datasets, liver masks (n, CROP, CROP) bool), slices sorted by position."""
    patient = shared_data / "3Dircadb1" / "3Dircadb1.17"
    images = _slices(patient / "PATIENT_DICOM.zip", "PATIENT_DICOM")
    liver = np.stack([ds.pixel_array > 0 for ds in _slices(patient / "MASKS_DICOM.zip", "MASKS_DICOM/liver")])
    z = np.nonzero(liver.any(axis=(1, 2)))[0]
    z0 = int(z.mean()) - SLICES // 2
    _, rows, cols = np.nonzero(liver[z0: z0 + SLICES])
    r0, c0 = int(rows.mean()) - CROP // 2, int(cols.mean()) - CROP // 2
    cropped = []
    for ds in images[z0: z0 + SLICES]:
        ds = copy.deepcopy(ds)
        pixels = ds.pixel_array[r0: r0 + CROP, c0: c0 + CROP]
        ds.PixelData, ds.Rows, ds.Columns = np.ascontiguousarray(pixels).tobytes(), CROP, CROP
        spacing, iop = [float(v) for v in ds.PixelSpacing], np.array(ds.ImageOrientationPatient, float)
        ds.ImagePositionPatient = (np.array(ds.ImagePositionPatient, float)
                                   + c0 * spacing[1] * iop[:3] + r0 * spacing[0] * iop[3:]).tolist()
        cropped.append(ds)
    masks = liver[z0: z0 + SLICES, r0: r0 + CROP, c0: c0 + CROP]
    assert masks.any(axis=(1, 2)).all()  # the crop is inside the liver's extent
    return cropped, masks


def _train_two_steps(root: pathlib.Path, tmp_path: pathlib.Path, **data) -> dict:
    """Returns the step reached and the last training loss of a tiny 2-step run on `root`."""
    c = base_config()
    c.model.name, c.model.features = "unet", (4, 8)
    c.data.update(dict(root=str(root), num_val_cases=1, patch_size=(16, 16, 16), batch_size=1,
                       cache_dir=str(tmp_path / "cache"), **data))
    c.train.update(dict(num_epochs=1, steps_per_epoch=2, log_every_steps=1, eval_every_epochs=0))
    summary = train_and_evaluate(c, tmp_path / "run", devices=jax.devices()[:1])
    losses = [r["loss"] for r in run_logging.read_metrics(tmp_path / "run") if r["kind"] == "train"]
    return {"step": summary["final_step"], "final_train_loss": losses[-1]}


# ------------------------------------------------------------------------------------- nnU-Net


def _write_nnunet(root: pathlib.Path, ircad_crop, labels: dict, liver: int, tumour: int, vessel: int) -> np.ndarray:
    """Writes Dataset042_Liver (3 training cases, 1 test image); returns the file label values."""
    datasets, masks = ircad_crop
    hu = np.stack([ds.pixel_array for ds in datasets]).astype(np.int16)  # (z, rows, cols)
    file_labels = np.where(masks, liver, 0).astype(np.uint8)
    file_labels[masks & (hu > np.percentile(hu[masks], 90))] = tumour  # the brightest tenth: "tumour"
    file_labels[masks & (hu < np.percentile(hu[masks], 5))] = vessel
    affine = np.diag([0.743, 0.743, 1.6, 1.0])
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    for n in range(3):  # cases rolled by a slice, to be distinct files
        image, label = (np.ascontiguousarray(np.roll(a, n, axis=0).transpose(2, 1, 0)) for a in (hu, file_labels))
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"liver_{n:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"liver_{n:03d}.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine),
             root / "imagesTs" / "liver_100_0000.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 3, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return file_labels


def test_nnunet_raw_dataset_is_remapped_discovered_and_trains(ircad_crop, tmp_path):
    root = tmp_path / "Dataset042_Liver"
    labels = {"background": 0, "tumour": 1, "liver": 2, "hepatic vessel": 3}
    file_labels = _write_nnunet(root, ircad_crop, labels, liver=2, tumour=1, vessel=3)
    assert detect_layout(root) == "nnunet"
    with pytest.raises(DataError, match=r"\['hepatic_vessel'\].*data.label_map"):
        discover(root)  # an unknown label is refused, naming the setting
    with pytest.raises(ValueError, match="says nothing about label.*hepatic_vessel"):
        discover(root, label_map="liver=liver,tumour=tumour")
    spec = "liver=liver,tumour=tumour,hepatic vessel=liver"
    cases = discover(root, label_map=spec)
    assert [c.case_id for c in cases] == ["liver_000", "liver_001", "liver_002"]
    assert cases[0].label_map == ((0, 0), (1, 2), (2, 1), (3, 1))
    case = nifti.read_case(cases[0].image, cases[0].label, value_map=cases[0].label_map)
    expected = np.choose(file_labels, [0, 2, 1, 1])  # file (z, rows, cols) -> classes
    assert np.array_equal(case.label, expected)  # a RAS-diagonal affine: internal (D, H, W) = (z, rows, cols)
    assert [(c.case_id, c.image.name) for c in find_inputs(root)] == [("liver_100", "liver_100_0000.nii.gz")]
    summary = _train_two_steps(root, tmp_path, label_map=spec)
    assert summary["step"] == 2 and np.isfinite(summary["final_train_loss"])


def test_nnunet_labels_by_name_ambiguity_and_msd_task03(tmp_path):
    from livseg_jax.data.layouts import nnunet_label_map

    assert nnunet_label_map({"background": 0, "liver": 1, "tumor": 2}, "", "d.json") is None
    assert nnunet_label_map({"background": 0, "Liver": 2, "Liver Tumour": 1}, "", "d.json") == ((0, 0), (1, 2), (2, 1))
    assert nnunet_label_map({"0": "background", "1": "liver", "2": "cancer"}, "", "d.json") is None  # MSD Task03
    with pytest.raises(DataError, match="ambiguous"):
        nnunet_label_map({"background": 0, "liver": 1, "tumour": 2, "lesion": 3}, "", "d.json")
    with pytest.raises(DataError, match="region-based"):
        nnunet_label_map({"background": 0, "liver": [1, 2], "tumour": 2}, "", "d.json")
    with pytest.raises(ValueError, match="'kidney' is not a label"):
        nnunet_label_map({"background": 0, "liver": 1}, "kidney=liver", "d.json")
    swapped = tmp_path / "Dataset007_Swapped"
    for name in ("imagesTr/a_0000.nii.gz", "labelsTr/a.nii.gz", "imagesTs/b_0000.nii.gz", "imagesTs/b_0001.nii.gz"):
        (swapped / name).parent.mkdir(parents=True, exist_ok=True)
        (swapped / name).write_bytes(b"")
    (swapped / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumor": 1, "liver": 2}, "file_ending": ".nii.gz"}))
    assert [(c.case_id, c.label_map) for c in discover(swapped)] == [("a", ((0, 0), (1, 2), (2, 1)))]
    with pytest.raises(DataError, match="need remapping"):  # evaluate would read them as 0/1/2
        truth_files(swapped)
    with pytest.raises(DataError, match="b_0001.nii.gz: input channel"):
        find_inputs(swapped)
    with pytest.raises(ValueError, match="data.label_map is for nnU-Net and MSD"):
        discover(swapped, layout="lits", label_map="liver=liver")
    # MSD Task03_Liver: a dataset.json with a training list keeps working, labels unchanged.
    for folder, name in (("imagesTr", "liver_0.nii.gz"), ("labelsTr", "liver_0.nii.gz")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}]}))
    assert detect_layout(tmp_path) == "msd"
    assert [(c.case_id, c.label_map) for c in discover(tmp_path)] == [("liver_0", None)]


# --------------------------------------------------------------------------------------- CHAOS


def _write_chaos_patient(folder: pathlib.Path, datasets, masks, reverse: bool) -> None:
    """Writes DICOM_anon/i00NN,0000b.dcm and Ground/liver_GT_0NN.png, numbered head-first when `reverse`."""
    (folder / "DICOM_anon").mkdir(parents=True)
    (folder / "Ground").mkdir()
    order = range(len(datasets))[::-1] if reverse else range(len(datasets))
    for name_index, k in enumerate(order):
        datasets[k].save_as(folder / "DICOM_anon" / f"i{name_index:04d},0000b.dcm")
        Image.fromarray(masks[k].astype(np.uint8) * 255).save(folder / "Ground" / f"liver_GT_{name_index:03d}.png")


def test_chaos_ct_sample_imports_to_lits_exactly_and_trains(ircad_crop, tmp_path, capsys):
    datasets, masks = ircad_crop
    src = tmp_path / "CT"
    for number, reverse in ((1, True), (2, False), (5, True)):
        _write_chaos_patient(src / str(number), datasets, masks, reverse)
    out = tmp_path / "lits"
    assert chaos.main(["--src", str(src), "--out", str(out)]) == 0
    assert "liver" in capsys.readouterr().out
    cases = discover(out)
    assert [c.case_id for c in cases] == ["volume-1", "volume-2", "volume-5"]
    hu = np.stack([ds.pixel_array for ds in datasets])
    first = datasets[0]
    for case in cases:  # head-first or feet-first names: the same volume and labels
        img, seg = nib.load(case.image), nib.load(case.label)
        assert np.array_equal(np.asarray(img.dataobj), hu.transpose(2, 1, 0))
        assert np.array_equal(np.asarray(seg.dataobj), masks.transpose(2, 1, 0).astype(np.uint8))
        sy, sx = (float(v) for v in first.PixelSpacing)  # between rows (y), between columns (x)
        x0, y0, z0 = (float(v) for v in first.ImagePositionPatient)
        step = float(datasets[1].ImagePositionPatient[2]) - z0
        assert np.allclose(img.affine, [[-sx, 0, 0, -x0], [0, -sy, 0, -y0], [0, 0, step, z0], [0, 0, 0, 1]])
    summary = _train_two_steps(out, tmp_path)
    assert summary["step"] == 2 and np.isfinite(summary["final_train_loss"])


def test_chaos_refuses_mismatched_counts_values_and_scrambled_names(ircad_crop, tmp_path):
    datasets, masks = ircad_crop
    patient = tmp_path / "3"
    _write_chaos_patient(patient, datasets[:4], masks[:4], reverse=False)
    (patient / "Ground" / "liver_GT_003.png").unlink()
    with pytest.raises(DataError, match="4 DICOM files but 3 PNG masks"):
        chaos.import_patient(patient, tmp_path / "out", 3)
    Image.fromarray(np.full((CROP, CROP), 7, np.uint8)).save(patient / "Ground" / "liver_GT_003.png")
    with pytest.raises(DataError, match=r"liver_GT_003\.png: mask values \[7\]"):
        chaos.import_patient(patient, tmp_path / "out", 3)
    a, b = patient / "DICOM_anon" / "i0001,0000b.dcm", patient / "DICOM_anon" / "i0002,0000b.dcm"
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    with pytest.raises(DataError, match="file names do not order the slices"):
        chaos.import_patient(patient, tmp_path / "out", 3)
    mixed = [copy.deepcopy(ds) for ds in datasets[:4]]
    mixed[2].SeriesInstanceUID = pydicom.uid.generate_uid()
    _write_chaos_patient(tmp_path / "4", mixed, masks[:4], reverse=False)
    with pytest.raises(DataError, match=r"2 series \(SeriesInstanceUID\) in one folder"):
        chaos.import_patient(tmp_path / "4", tmp_path / "out", 4)
    _write_chaos_patient(tmp_path / "6", [datasets[k] for k in (0, 2, 3, 4)], masks[[0, 2, 3, 4]], reverse=False)
    with pytest.raises(DataError, match="slice spacing is not uniform"):  # the shared reader's refusal
        chaos.import_patient(tmp_path / "6", tmp_path / "out", 6)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_remapping_refuses_undeclared_values_and_is_part_of_the_cache_key(tmp_path):
    from livseg_jax.data.cache import _source_of
    from livseg_jax.data.layouts import CaseFiles

    mapped = nifti.remap_labels(np.array([[0, 3], [1, 3]], np.int16), ((0, 0), (1, 2), (3, 1)), "f.nii")
    assert mapped.dtype == np.uint8 and mapped.tolist() == [[0, 1], [2, 1]]
    with pytest.raises(DataError, match=r"f\.nii: label values \[5\] are not among"):
        nifti.remap_labels(np.array([0, 1, 5]), ((0, 0), (1, 1)), "f.nii")
    image, label = tmp_path / "a_0000.nii.gz", tmp_path / "a.nii.gz"
    image.write_bytes(b"")
    label.write_bytes(b"")
    plain, swapped = CaseFiles("a", image, label), CaseFiles("a", image, label, ((1, 2), (2, 1)))
    assert "label_map" not in _source_of(plain)  # caches of datasets without remapping stay valid
    assert _source_of(plain) != _source_of(swapped)
