"""Times inflating a LiTS-sized `.nii.gz`: ISA-L on one core against rapidgzip on 1..N threads.

    python -m experiments.bench_gzip_inflate --out experiments/results/bench_gzip_inflate_cpu2.json
    python -m experiments.bench_gzip_inflate --shape 64,64,32 --repeats 1   # smoke test

Decides `livseg_jax.data.parallel_gzip.MIN_THREADS`: the number of usable cores from which
`nifti.read_image` inflates with rapidgzip instead of ISA-L. The CT is synthetic
(`data.synthetic.make_phantom`, int16, Gaussian noise, about 2x smaller gzipped, like real CT),
written by nibabel (one zlib member, as other tools write it). Per method, the median of
`--repeats` runs with the file in the page cache: `isal` (`isal.igzip.decompress`, what
`nifti` uses), `rapidgzip_T` (`rapidgzip.open(parallelization=T)`, T = 1, 2, 4, ... up to the
usable cores), and `read_image` and `read_image_native` (what `predict` reads) end to end with the fast path off
and forced on (all cores). The
JSON records the usable cores, versions and file size.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import tempfile
import time

import nibabel as nib
import numpy as np

from livseg_jax.atomic_write import write_json
from livseg_jax.data import nifti, parallel_gzip
from livseg_jax.data.slabs import usable_cpus
from livseg_jax.data.synthetic import make_phantom


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm the page cache and any lazy set-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="512,512,400", help="x,y,z of the synthetic CT")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--machine", default="", help="a few words naming the machine, recorded in the JSON")
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args()
    from isal import igzip

    rapidgzip = parallel_gzip.rapidgzip_module()
    shape = tuple(int(s) for s in args.shape.split(","))
    cores = usable_cpus()
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "volume.nii.gz"
        hu, _ = make_phantom(shape, (0.75, 0.75, 1.0), seed=0)
        nib.save(nib.Nifti1Image(np.asarray(hu).astype(np.int16), np.diag([0.75, 0.75, 1.0, 1.0])), path)
        del hu
        reference = igzip.decompress(path.read_bytes())
        seconds = {"isal": _median_seconds(lambda: igzip.decompress(path.read_bytes()), args.repeats)}
        threads = sorted({t for t in (1, 2, 4, 8, 16, 32, 64) if t <= cores} | {cores})
        if rapidgzip is not None:
            for t in threads:
                def read(t=t):
                    with rapidgzip.open(str(path), parallelization=t) as f:
                        return f.read()
                if read() != reference:
                    raise SystemExit(f"rapidgzip on {t} threads inflated different bytes")
                seconds[f"rapidgzip_{t}"] = _median_seconds(read, args.repeats)
            # On all cores, what `nifti` reads through: `parallel_gzip.inflate` (one preallocated
            # buffer filled by `readinto`) at several rapidgzip chunk sizes (its default is 4 MiB).
            thresholds = parallel_gzip.MIN_THREADS, parallel_gzip.MIN_BYTES
            parallel_gzip.MIN_THREADS, parallel_gzip.MIN_BYTES = 1, 0  # the fast path on any machine and file
            try:
                for mib in (0.5, 1, 2, 4, 8):
                    def inflate(mib=mib):
                        return parallel_gzip.inflate(path, threads=cores, chunk_bytes=int(mib * 2**20))
                    if inflate() != reference:
                        raise SystemExit(f"parallel_gzip.inflate with {mib} MiB chunks inflated different bytes")
                    seconds[f"rapidgzip_{cores}_readinto_chunk_{mib}mib"] = _median_seconds(inflate, args.repeats)
            finally:
                parallel_gzip.MIN_THREADS, parallel_gzip.MIN_BYTES = thresholds
        min_threads = parallel_gzip.MIN_THREADS
        try:
            parallel_gzip.MIN_THREADS = 10**9
            seconds["read_image_isal"] = _median_seconds(lambda: nifti.read_image(path), args.repeats)
            seconds["read_image_native_isal"] = _median_seconds(lambda: nifti.read_image_native(path), args.repeats)
            if rapidgzip is not None:
                parallel_gzip.MIN_THREADS, min_bytes, parallel_gzip.MIN_BYTES = 1, parallel_gzip.MIN_BYTES, 0
                seconds["read_image_rapidgzip_all_cores"] = _median_seconds(lambda: nifti.read_image(path),
                                                                            args.repeats)
                seconds["read_image_native_rapidgzip_all_cores"] = _median_seconds(
                    lambda: nifti.read_image_native(path), args.repeats)
                parallel_gzip.MIN_BYTES = min_bytes
        finally:
            parallel_gzip.MIN_THREADS = min_threads
        result = {
            "shape_xyz": list(shape), "gzip_mb": round(path.stat().st_size / 1e6, 1),
            "inflated_mb": round(len(reference) / 1e6, 1), "median_seconds": seconds, "repeats": args.repeats,
            "usable_cpus": cores, "min_threads_in_code": min_threads, "machine": args.machine,
            "python": platform.python_version(),
            "rapidgzip": getattr(rapidgzip, "__version__", None) if rapidgzip is not None else None,
        }
    print(result)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
