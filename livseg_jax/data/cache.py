"""Preprocessed-case cache: each case is read, checked and preprocessed once, then memory-mapped.

Layout: `<cache_dir>/preprocess-<settings hash>/` holds `settings.json` (the preprocessing settings
the hash was taken of) and, per case, `<case_id>.image.npy` (float32 (D, H, W), windowed and
scaled), `<case_id>.label.npy` (uint8, when the case has a label) and `<case_id>.json` (source
files' path/size/mtime, `PreprocessRecord`, `Geometry`). The JSON is written last, each file via a
temporary file and a rename, so an entry either is complete or does not exist. An entry is reused
when its JSON names the same source files with the same size and modification time; new
preprocessing settings (any of them: grid rule, target spacing, interpolation, window ...) give a
new folder, so changing them rebuilds everything. Temporary files of a build that was killed are
removed when the next build starts (`atomic_write.sweep_stale_temps`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import tqdm

from livseg_jax.atomic_write import atomic_path, sweep_stale_temps
from livseg_jax.data import preprocess as pp
from livseg_jax.data.layouts import CaseFiles
from livseg_jax.data.nifti import Geometry, PathLike, read_case

CACHE_VERSION = 1  # of the entry layout; part of the folder's key


# numpy parses a .npy header with `ast.literal_eval`, and CPython 3.11 before 3.11.8 can raise
# "SystemError: AST constructor recursion depth mismatch" when two threads parse at once (CPython
# gh-106905): the input pipeline's prefetch threads open cached cases concurrently (seen in the
# suite, session 11). Opening is serialised, which takes the pipeline's own threads out of that
# race (other threads' parses, e.g. `inspect` while tracing, remain); reading the arrays is not.
_OPEN_LOCK = threading.Lock()


def open_array(path: PathLike) -> np.ndarray:
    """Returns the cached .npy array at `path`, memory-mapped read-only."""
    with _OPEN_LOCK:
        return np.load(path, mmap_mode="r")


@dataclasses.dataclass(frozen=True)
class CachedCase:
    """One preprocessed case in the cache; `image`/`label` are memory-mapped (D, H, W) arrays."""

    case_id: str
    image_path: pathlib.Path
    label_path: pathlib.Path | None
    record: pp.PreprocessRecord
    geometry: Geometry  # of the source image, to write predictions back onto its grid
    source: CaseFiles

    @property
    def image(self) -> np.ndarray:
        """Returns the preprocessed image, (D, H, W) float32, memory-mapped read-only."""
        return open_array(self.image_path)

    @property
    def label(self) -> np.ndarray | None:
        """Returns the preprocessed label map, (D, H, W) uint8 memory-mapped, or None."""
        return None if self.label_path is None else open_array(self.label_path)

    @property
    def spacing(self) -> np.ndarray:
        """Returns the voxel spacing (sz, sy, sx) in mm after preprocessing, shape (3,)."""
        return np.asarray(self.record.spacing, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Returns the preprocessed (D, H, W) shape."""
        return tuple(self.record.shape)


def entry_folder(cache_dir: PathLike, settings: pp.PreprocessSettings) -> pathlib.Path:
    """Returns the cache sub-folder holding the entries preprocessed with `settings`."""
    return pathlib.Path(cache_dir) / f"preprocess-{settings.cache_key(CACHE_VERSION)}"


def _fingerprint(path: pathlib.Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    st = os.stat(path)
    return {"path": str(pathlib.Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)


def _write_atomic(path: pathlib.Path, write: Callable[[BinaryIO], Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _entry_paths(entry_dir: pathlib.Path, case_id: str) -> tuple[pathlib.Path, ...]:
    name = _safe_name(case_id)
    return (entry_dir / f"{name}.json", entry_dir / f"{name}.image.npy", entry_dir / f"{name}.label.npy")


def _source_of(case: CaseFiles) -> dict[str, Any]:
    source = {"image": _fingerprint(case.image), "label": _fingerprint(case.label)}
    if case.label_map is not None:  # a changed remapping rebuilds the entry
        source["label_map"] = [list(pair) for pair in case.label_map]
    return source


def _load_entry(case: CaseFiles, entry_dir: pathlib.Path) -> CachedCase | None:
    meta_path, image_path, label_path = _entry_paths(entry_dir, case.case_id)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("source") != _source_of(case) or not image_path.exists():
        return None
    if case.label is not None and not label_path.exists():
        return None
    try:
        record = pp.PreprocessRecord.from_dict(meta["record"])
        geometry = Geometry.from_dict(meta["geometry"])
    except (KeyError, TypeError, ValueError):
        return None
    return CachedCase(
        case_id=case.case_id,
        image_path=image_path,
        label_path=label_path if case.label is not None else None,
        record=record,
        geometry=geometry,
        source=case,
    )


def build_entry(case: CaseFiles, settings: pp.PreprocessSettings, entry_dir: PathLike) -> str:
    """Returns the case id after reading, preprocessing and writing one cache entry atomically."""
    entry_dir = pathlib.Path(entry_dir)
    source = _source_of(case)  # taken before reading: a file changed meanwhile is rebuilt next time
    loaded = read_case(case.image, case.label, case_id=case.case_id, value_map=case.label_map)
    image, label, record = pp.preprocess(loaded.image, loaded.spacing, settings, loaded.label)
    meta_path, image_path, label_path = _entry_paths(entry_dir, case.case_id)
    meta_path.unlink(missing_ok=True)  # the entry is invalid from here until its JSON is rewritten
    _write_atomic(image_path, lambda f: np.save(f, image))
    if label is not None:
        _write_atomic(label_path, lambda f: np.save(f, label))
    meta = {
        "case_id": case.case_id,
        "source": source,
        "record": record.to_dict(),
        "geometry": loaded.geometry.to_dict(),
    }
    _write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return case.case_id


def build_cache(
    cases: Sequence[CaseFiles],
    settings: pp.PreprocessSettings | Mapping[str, Any],
    cache_dir: PathLike,
    num_workers: int = 0,
    progress: bool = True,
) -> list[CachedCase]:
    """Returns the cached cases (in input order), preprocessing those missing or out of date.

    `settings` may also be a `preprocess` config section.
    """
    ids = [c.case_id for c in cases]
    if len(set(map(_safe_name, ids))) != len(ids):
        raise ValueError(f"case ids are not unique: {ids}")
    settings = pp.as_settings(settings)
    settings.check_resolved()  # a "median" spacing is computed by training before the cache is built
    entry_dir = entry_folder(cache_dir, settings)
    entry_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(entry_dir)
    settings_path = entry_dir / "settings.json"
    if not settings_path.exists():
        fields = settings.cache_fields(CACHE_VERSION)
        _write_atomic(settings_path, lambda f: f.write(json.dumps(fields, indent=1).encode()))

    todo = [c for c in cases if _load_entry(c, entry_dir) is None]
    if progress and todo:  # the path on its own line: as the bar's label it squeezes the bar away
        print(f"preprocessing {len(todo)} case(s) into {entry_dir}", flush=True)
    bar = tqdm.tqdm(total=len(todo), desc="preprocess", unit="case", disable=not progress or not todo)
    try:
        if num_workers <= 1 or len(todo) <= 1:
            for case in todo:
                build_entry(case, settings, entry_dir)
                bar.update(1)
        else:
            # spawn, not fork: the parent may have started JAX's threads, which fork would copy.
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(todo)), mp_context=ctx) as ex:
                futures = [ex.submit(build_entry, c, settings, entry_dir) for c in todo]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        future.result()
                        bar.update(1)
                except concurrent.futures.process.BrokenProcessPool as e:
                    raise RuntimeError(
                        f"preprocessing worker processes died ({e}); they are started with 'spawn', "
                        "which re-imports the main script: run from a file whose entry point is under "
                        "`if __name__ == '__main__':`, or use num_workers=0 (e.g. interactively)"
                    ) from e
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()

    out = []
    for case in cases:
        entry = _load_entry(case, entry_dir)
        if entry is None:
            raise RuntimeError(f"{entry_dir}: cache entry for {case.case_id} missing after building")
        out.append(entry)
    return out
