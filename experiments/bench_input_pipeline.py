"""Input pipeline throughput: training patches per second with 0, 2 and all grain workers on
LiTS-sized synthetic volumes (cached and preprocessed first, as in training).

    python -m experiments.bench_input_pipeline [--cases 2] [--shape 512,512,300] [--patch 48,256,256]

Writes experiments/results/bench_input_pipeline.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

from experiments.bench_common import environment, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--shape", default="512,512,300", help="raw x,y,z")
    parser.add_argument("--patch", default="48,256,256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--stage", default="liver")
    parser.add_argument("--workers", default=f"0,2,{os.cpu_count()}")
    args = parser.parse_args()
    from livseg_jax.config import base_config
    from livseg_jax.data import pipeline
    from livseg_jax.data.cache import build_cache
    from livseg_jax.data.synthetic import write_synthetic_dataset

    config = base_config()
    config.data.patch_size = tuple(int(v) for v in args.patch.split(","))
    root = pathlib.Path(tempfile.mkdtemp())
    shape = tuple(int(v) for v in args.shape.split(","))
    start = time.perf_counter()
    cases = write_synthetic_dataset(root / "syn", args.cases, shape, (0.75, 0.75, 1.0), seed=7)
    cached = build_cache(cases, config.preprocess, root / "cache", num_workers=0)
    print(f"{args.cases} cases {shape} generated and cached in {time.perf_counter() - start:.1f} s", flush=True)
    staged = [pipeline.index_case(c, args.stage, config.data.liver_margin_mm) for c in cached]
    sampler = pipeline.PatchSampler(staged, args.stage, config.data, 0, -1.0)
    rows = []
    for workers in sorted({int(w) for w in args.workers.split(",")}):
        dataset = pipeline.make_dataset(sampler, args.batch, args.batches + 2)
        it = pipeline.batch_iterator(dataset, workers, prefetch=2)
        next(it)  # start-up (worker processes) is not throughput
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        seconds = time.perf_counter() - t0
        rows.append({"workers": workers, "seconds": seconds, "patches_per_s": args.batches * args.batch / seconds})
        print(f"{workers} workers: {rows[-1]['patches_per_s']:.1f} patches/s", flush=True)
    payload = {"benchmark": "input_pipeline", "raw_shape": shape, "preprocessed_shape": list(cached[0].shape),
               "patch": list(config.data.patch_size), "batch": args.batch, "stage": args.stage,
               "environment": environment(), "rows": rows}
    print("\n| workers | patches/s |\n|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['patches_per_s']:.1f} |")
    print(f"wrote {write_result('bench_input_pipeline', payload)}")


if __name__ == "__main__":
    main()
