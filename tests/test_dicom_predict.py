"""`python -m livseg_jax.predict` on DICOM input with DICOM outputs.

The networks are replaced by a threshold (liver where HU > 0, tumour where HU > 100), so the test
checks the plumbing that is new here: which series is read, that the label map comes back on the
series' grid and slice order in every output format, and the refusals. The networks' own
prediction path is tested in test_predict_cli.py and test_two_stage.py.
"""

import json

import nibabel as nib
import numpy as np
import pytest
from test_dicom import ct_series, write_series, zip_folder

from livseg_jax import predict
from livseg_jax.data import dicom
from livseg_jax.inference import two_stage

hd = pytest.importorskip("highdicom")
pytest.importorskip("rt_utils")


class ThresholdPredictor(two_stage.Predictor):
    """Stands in for the networks: liver where HU > 0, tumour where HU > 100."""

    def __init__(self):
        super().__init__(liver=object())

    def warmup(self):
        return {}

    def settings(self):
        return {"threshold": True}

    def predict_array(self, image_dhw, spacing, progress=None):
        labels = (image_dhw > 0).astype(np.uint8)
        labels[image_dhw > 100] = 2
        return two_stage.CaseResult(labels, bool(labels.any()), {}, {}, [])


@pytest.fixture(autouse=True)
def threshold_networks(monkeypatch):
    monkeypatch.setattr(predict.Predictor, "from_checkpoints", classmethod(lambda cls, *a, **k: ThresholdPredictor()))
    monkeypatch.setattr(predict, "device_predictors", lambda predictor: [predictor])  # no variables to place


def phantom_hu(n=5, rows=12, cols=10):
    """Returns (n, rows, cols) HU: air, a soft-tissue block changing from slice to slice, a dense core."""
    hu = np.full((n, rows, cols), -1000, np.int16)
    for k in range(1, n - 1):
        hu[k, 2:9, 1 + k:8] = 60
        hu[k, 4:6, 3 + k:6] = 150
    return hu


def expected(hu):
    labels = (hu > 0).astype(np.uint8)
    labels[hu > 100] = 2
    return labels


def run(args, capsys):
    status = predict.main([*args, "--liver", "unused", "--no-progress", "--compilation-cache", "off"])
    return status, capsys.readouterr()


def test_dicom_zip_gives_nifti_seg_and_rtstruct_on_the_series_grid(tmp_path, capsys):
    hu = phantom_hu()
    archive = zip_folder(write_series(tmp_path / "CT_SERIES", ct_series(hu)), tmp_path / "CT_SERIES.zip")
    series = dicom.read_dicom_series(archive)
    out = tmp_path / "out"
    status, printed = run(["-i", str(archive), "-o", str(out), "--output-type", "nifti,dicom_seg",
                           "--output-type", "rtstruct"], capsys)
    assert status == 0, printed.err
    assert sorted(p.name for p in out.iterdir()) == [
        "CT_SERIES_seg.dcm", "CT_SERIES_seg.nii.gz", "CT_SERIES_seg_rtstruct.dcm", "CT_SERIES_seg_timings.json"]
    label_map = nib.load(out / "CT_SERIES_seg.nii.gz")
    np.testing.assert_allclose(label_map.affine, series.affine(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(label_map.dataobj).transpose(2, 1, 0), expected(hu))
    seg = hd.seg.segread(out / "CT_SERIES_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.datasets[0].SeriesInstanceUID
    back = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in series.datasets], segment_numbers=[1, 2])
    np.testing.assert_array_equal(back[..., 0], expected(hu) >= 1)
    np.testing.assert_array_equal(back[..., 1], expected(hu) == 2)
    timings = json.loads((out / "CT_SERIES_seg_timings.json").read_text())
    assert set(timings["dicom_outputs"]) == {"dicom_seg", "rtstruct"}


def test_several_series_need_series_uid_and_dicom_seg_alone_writes_no_nifti(tmp_path, capsys):
    hu = phantom_hu()
    first, second = ct_series(hu, description="arterial"), ct_series(hu + 1, description="venous")
    write_series(tmp_path / "study" / "a", first)
    write_series(tmp_path / "study" / "b", second)
    out = tmp_path / "out"
    status, printed = run(["-i", str(tmp_path / "study"), "-o", str(out)], capsys)
    assert status == 1 and "--series UID" in printed.err
    assert first[0].SeriesInstanceUID in printed.err and second[0].SeriesInstanceUID in printed.err
    assert not out.exists() or not any(out.iterdir())
    status, printed = run(["-i", str(tmp_path / "study"), "-o", str(out), "--series", second[0].SeriesInstanceUID,
                           "--output-type", "dicom_seg"], capsys)
    assert status == 0, printed.err
    assert sorted(p.name for p in out.iterdir()) == ["study_seg.dcm", "study_seg_timings.json"]
    seg = hd.seg.segread(out / "study_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == second[0].SeriesInstanceUID


def test_dicom_outputs_of_nifti_input_or_of_a_series_without_frame_of_reference_are_refused(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom_hu().transpose(2, 1, 0), np.eye(4)), ct)
    status, printed = run(["-i", str(ct), "-o", str(tmp_path / "out"), "--output-type", "rtstruct"], capsys)
    assert status == 1 and "rtstruct needs a DICOM input" in printed.err
    assert not (tmp_path / "out").exists()
    folder = write_series(tmp_path / "nofor", ct_series(phantom_hu(), frame_uid=None))
    status, printed = run(["-i", str(folder), "-o", str(tmp_path / "out2"), "--output-type", "nifti,dicom_seg"],
                          capsys)
    assert status == 1 and "no FrameOfReferenceUID" in printed.err
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def test_missing_highdicom_is_reported_before_the_models_load(tmp_path, capsys, monkeypatch):
    import sys

    folder = write_series(tmp_path / "ct", ct_series(phantom_hu()))
    monkeypatch.setitem(sys.modules, "highdicom", None)  # makes `import highdicom` raise ImportError
    monkeypatch.setattr(predict.Predictor, "from_checkpoints", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    status, printed = run(["-i", str(folder), "-o", str(tmp_path / "out"), "--output-type", "dicom_seg"], capsys)
    assert status == 1 and "livseg_jax[dicom]" in printed.err and "highdicom" in printed.err
