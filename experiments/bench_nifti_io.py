"""Times reading and writing a LiTS-sized .nii.gz: plain nibabel, Python's gzip read whole, ISA-L.

    python -m experiments.bench_nifti_io --out experiments/results/bench_nifti_io.json
    python -m experiments.bench_nifti_io --shape 64 64 32 --repeats 1 --out /tmp/smoke.json   # smoke test

Needs numpy and nibabel only. python-isal (`pip install isal`: `isal.igzip` and
`isal.igzip_threaded`, ISA-L's inflate/deflate) is timed when it can be imported, and so is
`livseg_jax.data.gzip_io`, the multi-threaded gzip the package had until this benchmark had it
removed (`git show 2d145a6:livseg_jax/data/gzip_io.py`), on checkouts that still have it. The
volumes are synthetic, made with NumPy: a 512x512x400 int16 CT (air, an elliptic body of soft
tissue with organs and bone, Gaussian noise of 20 HU everywhere, so gzip level 1 shrinks it 1.8x;
real CT: about 2x) and a uint8 label map (liver and tumour ellipsoids).

Each method turns the same `Nifti1Image` into a file and a file back into the voxel array, the
median of `--repeats` runs on files in the page cache:
  * read: the CT and the label map, each written by nibabel (one gzip member, as other tools
    write it) and by `gzip_io` (many members, inflated in parallel);
  * write: the CT and the label map.
Methods: `nibabel` (`nib.load(...).dataobj`, `nib.save`: zlib, streamed, one thread); `gzip_io` as
`livseg_jax.data.nifti` uses it (read into memory, parallel inflate where the file allows it;
write: compressed in chunks on all cores); `gzip_whole` (Python's `gzip` reads the whole file,
checking every member's CRC, then `from_bytes`: the read of `nifti.py`); `isal`
(`isal.igzip.decompress` in memory); `isal_threaded` (`isal.igzip_threaded.open` with all cores:
reading inflates on one thread beside the reader thread, writing compresses blocks in parallel).
Compression levels: zlib 1 (nibabel's default) and ISA-L 1 (its fastest but one); file sizes are
recorded.

The JSON records `os.cpu_count()`, the versions, every time and, per operation, how much time
`gzip_io` saves against plain nibabel and against the fastest other method.
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import nibabel as nib
import numpy as np

from livseg_jax.atomic_write import write_json

try:
    from livseg_jax.data import gzip_io
except ImportError:  # the benchmark outlives the module it judges
    gzip_io = None
try:
    import isal
    from isal import igzip, igzip_threaded
except ImportError:
    isal = None

SPACING = (0.75, 0.75, 1.0)  # mm, (x, y, z)
ZLIB_LEVEL = 1  # nibabel's default for .nii.gz
ISAL_LEVEL = 1


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns an (x, y, z) int16 CT in HU with noise and its uint8 0/1/2 label map."""
    rng = np.random.default_rng(seed)
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    xx, yy = np.meshgrid(x, y, indexing="ij")
    body = (xx / 0.85) ** 2 + (yy / 0.65) ** 2 < 1.0  # (x, y): the body's cross-section
    spine = (xx / 0.08) ** 2 + ((yy + 0.45) / 0.08) ** 2 < 1.0
    slice_hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    slice_hu[spine] = 700.0
    ct = np.empty(shape, np.int16)
    labels = np.zeros(shape, np.uint8)
    for k, zk in enumerate(z):  # slice by slice: bounded memory for 512x512x400
        liver = ((xx + 0.35) / 0.35) ** 2 + (yy / 0.3) ** 2 + (zk / 0.6) ** 2 < 1.0
        tumour = ((xx + 0.3) / 0.08) ** 2 + ((yy - 0.05) / 0.08) ** 2 + ((zk - 0.1) / 0.1) ** 2 < 1.0
        hu = slice_hu + np.where(liver, 20.0, 0.0) - np.where(tumour, 35.0, 0.0)
        hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)  # scanner noise, air included
        ct[:, :, k] = np.round(hu).astype(np.int16)
        labels[:, :, k] = np.where(tumour & liver, 2, liver).astype(np.uint8)
    return ct, labels


def _time(fn: Callable[[], object], repeats: int) -> dict:
    """Returns {"median_s", "min_s", "times_s"} of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def _read_gzip_whole(path: pathlib.Path) -> np.ndarray:
    """Returns the voxels of a .nii.gz read whole by Python's gzip (every member checked)."""
    with gzip.open(path, "rb") as f:
        return np.asanyarray(nib.Nifti1Image.from_bytes(f.read()).dataobj)


def readers(threads: int) -> dict[str, Callable[[pathlib.Path], np.ndarray]]:
    """Returns {method: path -> voxel array} for every method that can be imported."""
    methods = {
        "nibabel": lambda p: np.asanyarray(nib.load(p).dataobj),
        "gzip_whole": _read_gzip_whole,
    }
    if gzip_io is not None:  # as livseg_jax.data.nifti reads: the inflated pieces parsed in place
        methods["gzip_io"] = lambda p: np.asanyarray(nib.Nifti1Image.from_stream(
            gzip_io.PartsReader(gzip_io.read_file_parts(p, threads=threads))).dataobj)
    if isal is not None:
        methods["isal"] = lambda p: np.asanyarray(nib.Nifti1Image.from_bytes(igzip.decompress(p.read_bytes())).dataobj)

        def isal_threaded(p: pathlib.Path) -> np.ndarray:
            with igzip_threaded.open(p, "rb", threads=threads) as f:
                return np.asanyarray(nib.Nifti1Image.from_bytes(f.read()).dataobj)

        methods["isal_threaded"] = isal_threaded
    return methods


def writers(threads: int) -> dict[str, Callable[[nib.Nifti1Image, pathlib.Path], None]]:
    """Returns {method: (image, path) -> None} for every method that can be imported."""
    methods = {"nibabel": lambda img, p: nib.save(img, p)}
    if gzip_io is not None:  # as livseg_jax.data.nifti writes
        methods["gzip_io"] = lambda img, p: gzip_io.write_file(p, img.to_bytes(), level=ZLIB_LEVEL, threads=threads)
    if isal is not None:
        def isal_threaded(img: nib.Nifti1Image, p: pathlib.Path) -> None:
            with igzip_threaded.open(p, "wb", compresslevel=ISAL_LEVEL, threads=threads) as f:
                f.write(img.to_bytes())

        methods["isal_threaded"] = isal_threaded
    return methods


def savings(row: dict) -> dict:
    """Returns gzip_io's time saved (fraction of the other's median) against nibabel and the best other."""
    if "gzip_io" not in row["methods"]:
        return {}
    ours = row["methods"]["gzip_io"]["median_s"]
    others = {k: v["median_s"] for k, v in row["methods"].items() if k != "gzip_io"}
    best = min(others, key=others.get)
    return {"vs_nibabel": 1.0 - ours / others["nibabel"], "best_other": best,
            "vs_best_other": 1.0 - ours / others[best]}


def main(argv: list[str] | None = None) -> None:
    """Parses flags, times every method, prints a Markdown table and writes the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON file to write")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 400), metavar=("X", "Y", "Z"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads (default: all CPUs)")
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="where the files go (default: tmp)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    ct, labels = synthetic_ct(tuple(args.shape))
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # LPS-like, as DICOM conversions write
    images = {"CT": nib.Nifti1Image(np.asfortranarray(ct), affine),
              "label map": nib.Nifti1Image(np.asfortranarray(labels), affine)}
    print(f"volumes {tuple(args.shape)} in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, "
          f"{args.threads} threads; methods: nibabel, gzip_whole"
          f"{', gzip_io' if gzip_io else ''}{', isal, isal_threaded' if isal else ''}", flush=True)

    rows, sizes = [], {}
    read, write = readers(args.threads), writers(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = pathlib.Path(tmp)
        for name, img in images.items():
            expected = np.asanyarray(img.dataobj)
            sizes[f"{name} uncompressed"] = len(img.to_bytes())
            written = {}
            for method, fn in write.items():
                path = tmp / f"{name.replace(' ', '_')}_{method}.nii.gz"
                fn(img, path)
                written[method] = path
                sizes[f"{name} by {method}"] = path.stat().st_size
            sources = {"nibabel": written["nibabel"]}
            if "gzip_io" in written:
                sources["gzip_io"] = written["gzip_io"]
            for source, path in sources.items():
                row = {"op": f"read {name} written by {source}", "methods": {}}
                for method, fn in read.items():
                    if not np.array_equal(fn(path), expected):
                        raise SystemExit(f"{method} read {path} wrong")
                    row["methods"][method] = _time(lambda fn=fn, path=path: fn(path), args.repeats)
                rows.append(row)
                print(row["op"], {k: round(v["median_s"], 3) for k, v in row["methods"].items()}, flush=True)
            row = {"op": f"write {name}", "methods": {}}
            for method, fn in write.items():
                out = tmp / f"w_{method}.nii.gz"
                row["methods"][method] = _time(lambda fn=fn, img=img, out=out: fn(img, out), args.repeats)
            rows.append(row)
            print(row["op"], {k: round(v["median_s"], 3) for k, v in row["methods"].items()}, flush=True)
    for row in rows:
        row["gzip_io_saves"] = savings(row)

    methods = list(dict.fromkeys(m for row in rows for m in row["methods"]))
    print(f"\n{os.cpu_count()} CPUs, {args.threads} threads, median of {args.repeats}, seconds\n")
    print("| operation | " + " | ".join(methods) + " | gzip_io saves vs nibabel | vs fastest other |")
    print("|---|" + "---:|" * (len(methods) + 2))
    for row in rows:
        cells = [f"{row['methods'][m]['median_s']:.2f}" if m in row["methods"] else "-" for m in methods]
        save = row["gzip_io_saves"]
        extra = ([f"{save['vs_nibabel']:.0%}", f"{save['vs_best_other']:.0%} ({save['best_other']})"]
                 if save else ["-", "-"])
        print(f"| {row['op']} | " + " | ".join(cells + extra) + " |")
    payload = {
        "benchmark": "nifti_io", "command": " ".join(["python -m experiments.bench_nifti_io", *(argv or sys.argv[1:])]),
        "shape_xyz": list(args.shape), "spacing_xyz": list(SPACING), "repeats": args.repeats,
        "os_cpu_count": os.cpu_count(), "threads": args.threads, "zlib_level": ZLIB_LEVEL, "isal_level": ISAL_LEVEL,
        "python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__,
        "nibabel": nib.__version__, "isal": isal.__version__ if isal else None,
        "gzip_io": gzip_io is not None, "file_sizes_bytes": sizes, "rows": rows,
    }
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
