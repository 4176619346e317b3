"""Preprocessed-case cache: built once, reused, rebuilt on new settings or sources, never half-written."""

import json
import os

import numpy as np
import pytest

from livseg_jax.config import base_config
from livseg_jax.data import cache, nifti
from livseg_jax.data import preprocess as pp
from livseg_jax.data.layouts import CaseFiles, discover
from livseg_jax.data.nifti import DataError
from livseg_jax.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_cases=3, shape=(48, 44, 12), spacing=(2.0, 2.0, 4.0), seed=5)
    return root


def _counting(monkeypatch):
    calls = []
    real = cache.build_entry

    def counted(case, settings, entry_dir):
        calls.append(case.case_id)
        return real(case, settings, entry_dir)

    monkeypatch.setattr(cache, "build_entry", counted)
    return calls


def _leftovers(folder):
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


def test_cached_arrays_equal_direct_preprocessing(dataset, tmp_path):
    cases = discover(dataset)
    cfg = base_config().preprocess
    cached = cache.build_cache(cases, cfg, tmp_path, num_workers=0, progress=False)
    assert [c.case_id for c in cached] == ["volume-0", "volume-1", "volume-2"]
    for files, entry in zip(cases, cached, strict=True):
        case = nifti.read_case(files.image, files.label)
        image, label, record = pp.preprocess(case.image, case.spacing, cfg, case.label)
        np.testing.assert_array_equal(entry.image, image)
        np.testing.assert_array_equal(entry.label, label)
        assert entry.image.dtype == np.float32 and entry.label.dtype == np.uint8
        assert entry.record == record
        np.testing.assert_allclose(entry.spacing, record.spacing)
        np.testing.assert_array_equal(entry.geometry.affine, case.geometry.affine)


def test_second_build_reuses_entries(dataset, tmp_path, monkeypatch):
    cases = discover(dataset)
    cfg = base_config().preprocess
    cache.build_cache(cases, cfg, tmp_path, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}
    calls = _counting(monkeypatch)
    cache.build_cache(cases, cfg, tmp_path, progress=False)
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")} == stamps


def test_new_settings_rebuild_into_a_new_folder(dataset, tmp_path, monkeypatch):
    cases = discover(dataset)[:1]
    cfg = base_config().preprocess
    first = cache.build_cache(cases, cfg, tmp_path, progress=False)
    cfg.hu_max = 100.0
    calls = _counting(monkeypatch)
    second = cache.build_cache(cases, cfg, tmp_path, progress=False)
    assert calls == ["volume-0"]
    assert first[0].image_path.parent != second[0].image_path.parent
    assert second[0].image.max() <= 0.5 < first[0].image.max()
    new, old = (pp.PreprocessSettings.from_config(c) for c in (cfg, base_config().preprocess))
    assert new.cache_key(cache.CACHE_VERSION) != old.cache_key(cache.CACHE_VERSION)
    assert second[0].image_path.parent == cache.entry_folder(tmp_path, new)
    assert first[0].image_path.parent == cache.entry_folder(tmp_path, old)
    saved = json.loads((cache.entry_folder(tmp_path, new) / "settings.json").read_text())
    assert saved == new.cache_fields(cache.CACHE_VERSION) and saved["hu_max"] == 100.0


def test_changed_source_file_is_rebuilt(dataset, tmp_path, monkeypatch):
    cases = discover(dataset)[:2]
    cfg = base_config().preprocess
    cache.build_cache(cases, cfg, tmp_path, progress=False)
    st = os.stat(cases[1].image)
    os.utime(cases[1].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = _counting(monkeypatch)
    cache.build_cache(cases, cfg, tmp_path, progress=False)
    assert calls == ["volume-1"]


def test_parallel_build_matches_serial(dataset, tmp_path):
    cases = discover(dataset)
    cfg = base_config().preprocess
    serial = cache.build_cache(cases, cfg, tmp_path / "a", num_workers=0, progress=False)
    parallel = cache.build_cache(cases, cfg, tmp_path / "b", num_workers=2, progress=False)
    for s, p in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(s.image, p.image)
        np.testing.assert_array_equal(s.label, p.label)
        assert s.record == p.record


def test_bad_case_raises_naming_the_file_and_leaves_no_entry(dataset, tmp_path):
    bad = tmp_path / "volume-9.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    cases = [*discover(dataset)[:1], CaseFiles("volume-9", bad, None)]
    with pytest.raises(DataError, match=r"volume-9\.nii\.gz: cannot read as NIfTI"):
        cache.build_cache(cases, base_config().preprocess, tmp_path / "cache", progress=False)
    entry_dir = next((tmp_path / "cache").iterdir())
    assert not list(entry_dir.glob("volume-9*"))
    assert _leftovers(tmp_path / "cache") == []


def test_crash_while_writing_leaves_no_entry_and_next_build_recovers(dataset, tmp_path, monkeypatch):
    cases = discover(dataset)[:1]
    cfg = base_config().preprocess
    real_save = np.save
    saves = []

    def crash_on_label(f, arr, *a, **k):
        saves.append(arr.dtype)
        if arr.dtype == np.uint8:
            f.write(b"partial")
            raise OSError("disk full")
        return real_save(f, arr, *a, **k)

    monkeypatch.setattr(np, "save", crash_on_label)
    with pytest.raises(OSError, match="disk full"):
        cache.build_cache(cases, cfg, tmp_path, progress=False)
    assert saves == [np.float32, np.uint8]
    entry_dir = cache.entry_folder(tmp_path, pp.PreprocessSettings.from_config(cfg))
    assert not (entry_dir / "volume-0.json").exists()
    assert not (entry_dir / "volume-0.label.npy").exists()
    assert _leftovers(tmp_path) == []
    monkeypatch.setattr(np, "save", real_save)
    (entry,) = cache.build_cache(cases, cfg, tmp_path, progress=False)
    assert entry.label is not None and entry.label.shape == entry.image.shape


def test_unlabelled_case_is_cached_without_label(dataset, tmp_path):
    files = discover(dataset)[0]
    (entry,) = cache.build_cache(
        [CaseFiles("scan", files.image, None)], base_config().preprocess, tmp_path, progress=False
    )
    assert entry.label is None and entry.label_path is None
    assert entry.image.shape == entry.shape


def test_progress_prints_the_path_once_and_labels_the_bar_shortly(dataset, tmp_path, capsys):
    cases = discover(dataset)[:1]
    cache.build_cache(cases, base_config().preprocess, tmp_path, progress=True)
    out, err = capsys.readouterr()
    (entry_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert f"preprocessing 1 case(s) into {entry_dir}" in out
    assert "preprocess: 100%" in err and str(tmp_path) not in err  # the path would squeeze the bar
    cache.build_cache(cases, base_config().preprocess, tmp_path, progress=True)
    assert capsys.readouterr() == ("", "")  # all cached: no line, no bar
