"""Times and measures the memory of reading a DICOM series the way `predict` reads it.

    python -m experiments.bench_dicom_read --input ../shared/data/3Dircadb1/3Dircadb1.17/PATIENT_DICOM.zip \
        --out experiments/results/bench_dicom_read.json

What is measured is `predict`'s DICOM read (`predict.DicomReader`): `dicom.list_series` (find the
series), `dicom.read_series` (headers, pixels, sorting, rescaling) and `dicom.image_and_geometry`
(the internal (D, H, W) float32 volume the networks see), from the file to the volume. Per phase and
in total: the median wall time of `--repeats` runs (files in the page cache), and the peak of the
memory Python and NumPy allocate during one run (`tracemalloc`, which NumPy reports its buffers to),
also in units of the float32 volume. The JSON records the machine's CPU count and the commit.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import subprocess
import time
import tracemalloc

import numpy as np

from livseg_jax.atomic_write import write_json
from livseg_jax.data import dicom


def read_like_predict(path: pathlib.Path) -> tuple[np.ndarray, dict[str, float]]:
    """Returns (internal float32 volume, seconds per phase) of reading `path` as `predict` does."""
    seconds = {}
    start = time.perf_counter()
    chosen = dicom.select_series(dicom.list_series(path), None, path)
    seconds["list_series"] = time.perf_counter() - start
    start = time.perf_counter()
    series = dicom.read_series(chosen.files, str(path))
    seconds["read_series"] = time.perf_counter() - start
    start = time.perf_counter()
    image, _ = dicom.image_and_geometry(series)
    seconds["image_and_geometry"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())
    return image, seconds


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, type=pathlib.Path, help="DICOM series folder or zip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--machine", default="", help="a few words naming the machine, recorded in the JSON")
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args()

    read_like_predict(args.input)  # warm the page cache and the imports
    runs = [read_like_predict(args.input)[1] for _ in range(args.repeats)]
    tracemalloc.start()
    image, _ = read_like_predict(args.input)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    volume_mb = image.nbytes / 2**20
    result = {
        "input": str(args.input), "shape_dhw": list(image.shape), "volume_float32_mib": round(volume_mb, 1),
        "median_seconds": {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]},
        "peak_traced_mib": round(peak / 2**20, 1), "peak_in_volumes": round(peak / image.nbytes, 2),
        "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": args.machine, "python": platform.python_version(), "commit": _commit(),
    }
    print(result)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
