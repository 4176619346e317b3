"""Times the full metric set of `livseg_jax.metrics` on one synthetic CT-sized case.

    python -m experiments.bench_metrics                 # 512x512x500, writes the JSON below
    python -m experiments.bench_metrics --medpy         # also times medpy's full-volume assd+hd95
    python -m experiments.bench_metrics --shape 256 256 200 --repeats 1

The case: a liver-sized, irregular blob (about 1.6 L) with a few tumours inside, at a spacing of
0.75 x 0.75 x 1.0 mm, and a prediction that is the truth deformed (surface noise, a small shift),
with one tumour missed and one false-positive tumour. Prints a table and writes
experiments/results/bench_metrics.json (timings, case description, CPU and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy
from scipy import ndimage

from experiments.bench_common import RESULTS
from livseg_jax import metrics
from livseg_jax.atomic_write import write_json
from livseg_jax.data.regions import bbox_of

SPACING = (0.75, 0.75, 1.0)  # mm, (X, Y, Z): a typical LiTS in-plane spacing and 1 mm slices
DEFAULT_OUT = RESULTS / "bench_metrics.json"


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    """Returns a low-frequency random field of `shape` in [-1, 1] (a coarse grid, upsampled)."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells,) * len(shape))
    zoom = [s / cells for s in shape]
    return ndimage.zoom(coarse, zoom, order=3, mode="nearest")[tuple(slice(0, s) for s in shape)]


def _ellipsoid(
    shape: tuple[int, int, int],
    centre_mm: np.ndarray,
    semi_axes_mm: np.ndarray,
    noise: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Returns the voxels whose normalised ellipsoid radius² is <= 1 + noise (open-grid, cheap)."""
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r2 = (
        ((x * SPACING[0] - centre_mm[0]) / semi_axes_mm[0]) ** 2
        + ((y * SPACING[1] - centre_mm[1]) / semi_axes_mm[1]) ** 2
        + ((z * SPACING[2] - centre_mm[2]) / semi_axes_mm[2]) ** 2
    )
    return r2 <= 1.0 + noise


def make_case(shape: tuple[int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Returns liver and tumour masks (truth and prediction), each boolean of `shape` (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    extent = np.array(shape) * np.array(SPACING)
    centre = extent * np.array([0.42, 0.55, 0.5])
    semi = np.minimum(np.array([95.0, 75.0, 55.0]), extent * 0.35)
    # The irregular surfaces only need noise inside a box around the liver.
    lo = np.maximum(((centre - 1.4 * semi) / SPACING).astype(int), 0)
    hi = np.minimum(((centre + 1.4 * semi) / SPACING).astype(int), shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub_shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    sub_centre = centre - lo * np.array(SPACING)

    def sub_ellipsoid(c, s, noise=0.0):
        return _ellipsoid(sub_shape, c, s, noise)

    liver_t = np.zeros(shape, bool)
    liver_p = np.zeros(shape, bool)
    liver_t[box] = sub_ellipsoid(sub_centre, semi, 0.25 * _smooth_noise(sub_shape, rng))
    shifted = sub_centre + np.array([1.5, -1.0, 1.0])
    liver_p[box] = sub_ellipsoid(shifted, semi * 1.02, 0.25 * _smooth_noise(sub_shape, rng))

    tumour_t = np.zeros(shape, bool)
    tumour_p = np.zeros(shape, bool)
    # (offset from the liver centre as a fraction of the semi-axes, radius mm, detected?)
    tumours = [
        ((0.3, 0.2, 0.1), 22.0, True),
        ((-0.4, 0.1, -0.2), 12.0, True),
        ((0.1, -0.5, 0.3), 6.0, True),
        ((-0.2, -0.3, -0.4), 4.0, False),
    ]
    for frac, radius, detected in tumours:
        c = sub_centre + np.array(frac) * semi
        ball = sub_ellipsoid(c, np.full(3, radius))
        tumour_t[box] |= ball
        if detected:
            tumour_p[box] |= sub_ellipsoid(c + 1.0, np.full(3, radius * 0.9))
    tumour_p[box] |= sub_ellipsoid(sub_centre + np.array([0.0, 0.5, -0.1]) * semi, np.full(3, 5.0))
    tumour_t &= liver_t
    tumour_p &= liver_p
    return {"liver_p": liver_p, "liver_t": liver_t, "tumour_p": tumour_p, "tumour_t": tumour_t}


def _time(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    """Returns ({median_s, min_s, repeats}, last result) of calling fn `repeats` times."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}, result


def _cpu_info() -> dict[str, Any]:
    """Returns the CPU model, the cores this process may use, and the software versions."""
    model = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def _medpy_version() -> str:
    """Returns the installed medpy version (the reference implementation)."""
    from importlib.metadata import version

    return version("medpy")


def _medpy_reference(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    """Returns medpy's assd and hd95 on the full volume (the all-voxels reference)."""
    from medpy.metric import binary as mb

    return {"asd": mb.assd(p, t, voxelspacing=SPACING), "hd95": mb.hd95(p, t, voxelspacing=SPACING)}


def run(shape: tuple[int, int, int], repeats: int, with_medpy: bool) -> dict[str, Any]:
    """Returns the benchmark record: case description, timings per task and results."""
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    case = make_case(shape)
    build_s = time.perf_counter() - t0
    lp, lt, tp, tt = case["liver_p"], case["liver_t"], case["tumour_p"], case["tumour_t"]
    tasks: dict[str, Callable[[], Any]] = {
        "liver: overlap (dice, iou, precision, recall, rvd)": lambda: metrics.overlap_metrics(lp, lt),
        "liver: surface (asd, hd95)": lambda: metrics.surface_metrics(lp, lt, SPACING),
        "liver: binary_metrics (all 7)": lambda: metrics.binary_metrics(lp, lt, SPACING),
        "tumour: binary_metrics (all 7)": lambda: metrics.binary_metrics(tp, tt, SPACING),
        "tumour: lesion_detection": lambda: metrics.lesion_detection(tp, tt, SPACING),
        "tumour: tumor_size_row": lambda: metrics.tumor_size_row("bench", tp, tt, SPACING),
    }

    def full_set():
        return (
            metrics.binary_metrics(lp, lt, SPACING),
            metrics.binary_metrics(tp, tt, SPACING),
            metrics.lesion_detection(tp, tt, SPACING),
            metrics.tumor_size_row("bench", tp, tt, SPACING),
        )

    tasks["full metric set (liver + tumour + lesions + size)"] = full_set
    timings, results = {}, {}
    for name, fn in tasks.items():
        timings[name], results[name] = _time(fn, repeats)
    if with_medpy:
        timings["medpy full volume: liver assd + hd95"], results["medpy"] = _time(
            lambda: _medpy_reference(lp, lt), 1
        )
    liver_row = results["liver: binary_metrics (all 7)"]
    lesions = results["tumour: lesion_detection"]
    box = bbox_of(lp | lt)
    return {
        "command": " ".join(["python", "-m", "experiments.bench_metrics", *sys.argv[1:]]),
        "case": {
            "shape_xyz": list(shape),
            "spacing_mm": list(SPACING),
            "liver_volume_ml": float(lt.sum() * np.prod(SPACING) / 1000.0),
            "liver_union_bbox_voxels": int(np.prod([s.stop - s.start for s in box])),
            "tumour_voxels": int(tt.sum()),
            "build_s": build_s,
        },
        "results": {
            "liver": {k: liver_row[k] for k in metrics.METRIC_NAMES},
            "tumour": {k: results["tumour: binary_metrics (all 7)"][k] for k in metrics.METRIC_NAMES},
            "lesions": {k: v for k, v in lesions.items() if k.startswith("n_")},
            **({"medpy_liver": results["medpy"]} if with_medpy else {}),
        },
        "timings": timings,
        "machine": {**_cpu_info(), **({"medpy": _medpy_version()} if with_medpy else {})},
        # Other jobs share the CPU: the 1-minute load average before and after says how much.
        "load_average_1min": {
            "before": load_before[0] if load_before else None,
            "after": os.getloadavg()[0] if load_before else None,
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Parses flags, runs the benchmark, prints a table and writes the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 500), metavar="N")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--medpy", action="store_true", help="also time medpy on the full volume")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    record = run(tuple(args.shape), args.repeats, args.medpy)
    machine = record["machine"]
    print(
        f"case {record['case']['shape_xyz']} spacing {SPACING} mm on {machine['cpu_model']} "
        f"({machine['usable_cores']} usable cores)"
    )
    print(f"{'task':<55} {'median s':>9} {'min s':>8}")
    for name, t in record["timings"].items():
        print(f"{name:<55} {t['median_s']:>9.3f} {t['min_s']:>8.3f}")
    print(json.dumps(record["results"], indent=1))
    write_json(args.out, record, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
