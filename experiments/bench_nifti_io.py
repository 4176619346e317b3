"""Times reading and writing a LiTS-sized .nii.gz: plain nibabel against `gzip_io` / `nifti`.

    python experiments/bench_nifti_io.py                         # 512x512x400, writes the JSON below
    python experiments/bench_nifti_io.py --shape 128 128 64 --repeats 1 --no-write   # smoke test

The volume is the synthetic phantom (`make_phantom`, 0.75 x 0.75 x 1.0 mm): int16 HU with smooth
anatomy and Gaussian noise (gzip ratio ~2, like real CT) and its uint8 liver/tumour label map
(ratio ~190), stored with the phantom's LPS-like affine (x and y flipped, as DICOM conversions write).

Two levels, each the median of `--repeats` runs on files in the page cache:
  * gzip level: the same nibabel image object through nibabel (`nib.load(...).get_fdata`,
    `np.asanyarray(nib.load(...).dataobj)`, `nib.save`) and through the new path (`gzip_io` inflate
    + `from_bytes`, `nifti.save_nifti`), for 1 thread and for all CPUs;
  * API level: `nifti.read_image`, `nifti.write_label_map`, `nifti.read_label` as of commit
    `BASELINE_COMMIT` (nibabel's gzip) against the working tree (adds the transposition and float64
    label fixes of the same change).
Input CTs come from elsewhere, so "read image" reads a nibabel-written (single-member) file; files
this code wrote (multi-member) are timed too. Writes experiments/results/bench_nifti_io.json and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import nibabel as nib
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from bench_common import environment, write_result  # noqa: E402

from livseg_jax.data import gzip_io, nifti  # noqa: E402
from livseg_jax.data.synthetic import make_phantom, phantom_affine  # noqa: E402

BASELINE_COMMIT = "62ada0729cff704c603ba2d70cda0037f672c407"  # last nifti.py before gzip_io
SPACING = (0.75, 0.75, 1.0)


def _time(fn: Callable[[], object], repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        del result
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def _baseline_nifti():
    """Returns nifti.py as of BASELINE_COMMIT imported as a separate module, or None without git."""
    try:
        src = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:livseg_jax/data/nifti.py"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = pathlib.Path(tempfile.mkdtemp()) / "nifti_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("nifti_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _read_fast(path: pathlib.Path, threads: int) -> nib.Nifti1Image:
    """The new read path of `nifti.load_image` with an explicit thread count."""
    return nib.Nifti1Image.from_bytes(gzip_io.read_file(path, threads=threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 400), metavar=("X", "Y", "Z"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="where to put the files (default: tmp)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write the JSON")
    parser.add_argument("--name", default="bench_nifti_io", help="result file name (without .json)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", nifti.HUWarning)

    all_threads = gzip_io.default_threads()
    thread_counts = sorted({1, all_threads})
    t0 = time.perf_counter()
    hu, lab = make_phantom(tuple(args.shape), SPACING, seed=0)
    affine = phantom_affine(tuple(args.shape), SPACING)
    print(f"phantom {tuple(args.shape)} in {time.perf_counter() - t0:.1f} s; threads {thread_counts}", flush=True)
    # Images whose arrays are Fortran-ordered, as `nifti.write_array` now hands them to nibabel, so
    # that the gzip-level comparison measures serialisation + compression only.
    hu_img = nib.Nifti1Image(np.asfortranarray(hu), affine)
    lab_img = nib.Nifti1Image(np.asfortranarray(lab), affine)
    del hu

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = pathlib.Path(tmp)
        ct_nib, lab_nib = tmp / "ct_nibabel.nii.gz", tmp / "lab_nibabel.nii.gz"
        ct_new, lab_new = tmp / "ct_new.nii.gz", tmp / "lab_new.nii.gz"
        nib.save(hu_img, ct_nib)
        nib.save(lab_img, lab_nib)
        nifti.save_nifti(hu_img, ct_new)
        nifti.save_nifti(lab_img, lab_new)
        raw_ct, raw_lab = len(hu_img.to_bytes()), len(lab_img.to_bytes())
        sizes = {
            "ct_uncompressed": raw_ct, "ct_nibabel_gz": ct_nib.stat().st_size, "ct_new_gz": ct_new.stat().st_size,
            "label_uncompressed": raw_lab, "label_nibabel_gz": lab_nib.stat().st_size,
            "label_new_gz": lab_new.stat().st_size,
            "ct_new_members": len(gzip_io.member_sizes(ct_new.read_bytes())),
            "label_new_members": len(gzip_io.member_sizes(lab_new.read_bytes())),
        }
        rows: list[dict] = []

        def row(level: str, op: str, old: Callable | None, new: dict[str, Callable]) -> None:
            entry = {"level": level, "op": op}
            if old is not None:
                entry["old"] = _time(old, args.repeats)
            for key, fn in new.items():
                entry[key] = _time(fn, args.repeats)
            rows.append(entry)
            shown = {k: round(v["median_s"], 3) for k, v in entry.items() if isinstance(v, dict)}
            print(f"{level:5s} {op:45s} {shown}", flush=True)

        f32 = np.float32
        row("gzip", "read CT (nibabel-written, 1 member)",
            lambda: nib.load(ct_nib).get_fdata(dtype=f32),
            {f"new_t{t}": (lambda t=t: _read_fast(ct_nib, t).get_fdata(dtype=f32)) for t in thread_counts})
        row("gzip", "read CT (written here, multi-member)",
            lambda: nib.load(ct_new).get_fdata(dtype=f32),
            {f"new_t{t}": (lambda t=t: _read_fast(ct_new, t).get_fdata(dtype=f32)) for t in thread_counts})
        row("gzip", "write label map",
            lambda: nib.save(lab_img, tmp / "w_old.nii.gz"),
            {f"new_t{t}": (lambda t=t: nifti.save_nifti(lab_img, tmp / "w_new.nii.gz", threads=t))
             for t in thread_counts})
        row("gzip", "write CT",
            lambda: nib.save(hu_img, tmp / "w_old.nii.gz"),
            {f"new_t{t}": (lambda t=t: nifti.save_nifti(hu_img, tmp / "w_new.nii.gz", threads=t))
             for t in thread_counts})
        row("gzip", "read label map (nibabel-written)",
            lambda: np.asanyarray(nib.load(lab_nib).dataobj),
            {f"new_t{t}": (lambda t=t: np.asanyarray(_read_fast(lab_nib, t).dataobj)) for t in thread_counts})
        row("gzip", "read label map (written here)",
            lambda: np.asanyarray(nib.load(lab_new).dataobj),
            {f"new_t{t}": (lambda t=t: np.asanyarray(_read_fast(lab_new, t).dataobj)) for t in thread_counts})

        base = _baseline_nifti()
        labels_dhw, geometry = nifti.read_label(lab_nib)  # (D, H, W) C-ordered, as predictions are
        row("api", "read_image (nibabel-written CT)",
            (lambda: base.read_image(ct_nib)) if base else None, {"new": lambda: nifti.read_image(ct_nib)})
        row("api", "read_image (CT written here)",
            (lambda: base.read_image(ct_new)) if base else None, {"new": lambda: nifti.read_image(ct_new)})
        row("api", "write_label_map",
            (lambda: base.write_label_map(labels_dhw, geometry, tmp / "p_old.nii.gz")) if base else None,
            {"new": lambda: nifti.write_label_map(labels_dhw, geometry, tmp / "p_new.nii.gz")})
        row("api", "read_label (old: nibabel-written, new: written here)",
            (lambda: base.read_label(tmp / "p_old.nii.gz")) if base else None,
            {"new": lambda: nifti.read_label(tmp / "p_new.nii.gz")})
        assert np.array_equal(nifti.read_label(tmp / "p_new.nii.gz")[0], labels_dhw)
        assert np.array_equal(np.asanyarray(nib.load(tmp / "p_new.nii.gz").dataobj), lab)

    payload = {
        "shape_xyz": list(args.shape), "spacing_xyz": list(SPACING), "repeats": args.repeats,
        "os_cpu_count": os.cpu_count(), "default_threads": all_threads, "thread_counts": thread_counts,
        "compress_level": gzip_io.DEFAULT_LEVEL, "chunk_size": gzip_io.DEFAULT_CHUNK_SIZE,
        "nibabel": nib.__version__, "numpy": np.__version__, "baseline_commit": BASELINE_COMMIT,
        "file_sizes_bytes": sizes, "rows": rows, "environment": environment(),
    }
    all_key = f"new_t{all_threads}"
    print(f"\nmedian (min) of {args.repeats} runs, seconds; speed-up of medians, old / new with all threads")
    print(f"\n| level | operation | old | new, 1 thread | new, {all_threads} threads | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cell = {k: f"{r[k]['median_s']:.2f} ({r[k]['min_s']:.2f})" if k in r else "-"
                for k in ("old", "new_t1", all_key, "new")}
        best = r.get(all_key, r.get("new"))
        speedup = f"{r['old']['median_s'] / best['median_s']:.1f}x" if "old" in r else "-"
        many = cell[all_key] if all_key in r else cell["new"]
        print(f"| {r['level']} | {r['op']} | {cell['old']} | {cell['new_t1']} | {many} | {speedup} |")
    print(f"\nfile sizes: {sizes}")
    if not args.no_write:
        print(f"wrote {write_result(args.name, payload)}")


if __name__ == "__main__":
    main()
