"""Data-parallel training throughput on 1..N GPUs of one host at a fixed per-GPU batch (weak scaling).

    python -m experiments.bench_scaling [--devices 1,2,4,8] [--dtypes bfloat16,float32]
        [--per-device-batch 2] [--patch 48,256,256] [--pipeline-cases 2]

The same jitted step as training (`livseg_jax.training.step`): batch sharded over a `data` mesh
axis, state replicated, XLA inserting the gradient all-reduce. Two measurements per GPU count:

- `fixed`: the batch is already on the devices: compute plus all-reduce.
- `pipeline`: batches come from the training input pipeline (grain, synthetic CT cases cached as in
  training, in-process workers) and are placed with `to_global_batch`, exactly as the training
  loop does. GPU idle fraction = 1 - fixed / pipeline step time.

Efficiency = throughput(n) / (n * throughput(1)). The result file is rewritten after every
measured configuration, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import tempfile
import time

import numpy as np

from experiments.bench_common import (
    apply_overrides,
    enable_compilation_cache,
    environment,
    median_time,
    parse_overrides,
    write_result,
)


def build_pipeline_cases(args, config):
    """Writes synthetic CT cases, preprocesses them into the training cache; returns StageCases."""
    from livseg_jax.data import pipeline
    from livseg_jax.data.cache import build_cache
    from livseg_jax.data.synthetic import write_synthetic_dataset

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    shape = tuple(int(v) for v in args.pipeline_shape.split(","))
    cases = write_synthetic_dataset(root / "syn", args.pipeline_cases, shape, (0.75, 0.75, 1.0), seed=7)
    cached = build_cache(cases, config.preprocess, root / "cache", num_workers=min(args.pipeline_cases, 8),
                         progress=False)
    return [pipeline.index_case(c, "liver", config.data.liver_margin_mm) for c in cached]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--patch", default="48,256,256")
    parser.add_argument("--variant", default="elanres_msca_unet")
    parser.add_argument("--overrides", default="depthwise_impl=shift")
    parser.add_argument("--features", default="")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--pipeline-cases", type=int, default=2, help="0 skips the pipeline-fed measurement")
    parser.add_argument("--pipeline-shape", default="512,512,200", help="raw x,y,z of each synthetic case")
    parser.add_argument("--pipeline-workers", type=int, default=0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    enable_compilation_cache()
    import jax

    from livseg_jax.config import base_config
    from livseg_jax.data import pipeline
    from livseg_jax.models import build_model
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import create_train_state
    from livseg_jax.training.step import batch_sharding, jit_train_step, make_mesh, make_train_step, replicated

    config = base_config()
    config.data.patch_size = tuple(int(v) for v in args.patch.split(","))
    patch = config.data.patch_size
    counts = [int(v) for v in args.devices.split(",")]
    skipped = [n for n in counts if n > len(jax.devices())]
    for n in skipped:
        print(f"skipping {n} devices: only {len(jax.devices())} present")
    counts = [n for n in counts if n not in skipped]

    def model_for(dtype: str):
        model_config = config.model.copy_and_resolve_references()
        model_config.name, model_config.dtype = args.variant, dtype
        apply_overrides(model_config, parse_overrides(args.overrides))
        if args.features:
            model_config.features = tuple(int(v) for v in args.features.split(","))
        return model_config, build_model(model_config)

    optimizer = make_optimizer(config.optim, 100)
    runs = []
    for dtype in args.dtypes.split(","):
        model_config, model = model_for(dtype)
        for n in counts:
            mesh = make_mesh(jax.devices()[:n])
            batch = n * args.per_device_batch
            init = jax.jit(lambda model=model: create_train_state(model, optimizer, patch, 0),
                           out_shardings=replicated(mesh))
            abstract_state = jax.eval_shape(init)
            abstract_state = jax.tree.map(lambda a, m=mesh: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                                 sharding=replicated(m)),
                                          abstract_state)
            abstract_batch = {
                "image": jax.ShapeDtypeStruct((batch, *patch, 1), np.float32, sharding=batch_sharding(mesh)),
                "label": jax.ShapeDtypeStruct((batch, *patch), np.int32, sharding=batch_sharding(mesh)),
            }
            step = jit_train_step(make_train_step(model, optimizer, config.loss, 100), mesh)
            runs.append({"dtype": dtype, "devices": n, "global_batch": batch, "mesh": mesh, "init": init,
                         "lowered": step.lower(abstract_state, abstract_batch), "model": model_config.to_dict()})

    # The synthetic cases are built in a thread while the step functions compile. Compilation is
    # sequential: on a 4x H200 host, three 48x256x256 steps compiled in parallel threads had not
    # finished after 400 s, while one compiles in about 150 s (docs/benchmarks.md).
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    staged = pool.submit(build_pipeline_cases, args, config) if args.pipeline_cases else None
    sampler = None

    def write_rows(rows: list[dict]) -> None:
        """Adds speed-up and efficiency, writes the result file (after every row: partial runs count)."""
        for row in rows:
            base = next((b for b in rows if b["devices"] == 1 and b["dtype"] == row["dtype"]), None)
            if base:
                row["speedup"] = row["patches_per_s"] / base["patches_per_s"]
                row["efficiency"] = row["speedup"] / row["devices"]
        payload = {"benchmark": "scaling", "patch": list(patch), "per_device_batch": args.per_device_batch,
                   "variant": args.variant, "overrides": args.overrides,
                   "pipeline": {"cases": args.pipeline_cases, "raw_shape": args.pipeline_shape,
                                "workers": args.pipeline_workers},
                   "skipped_device_counts": skipped, "models": {r["dtype"]: r["model"] for r in runs},
                   "environment": environment(), "rows": rows}
        print("\n| dtype | GPUs | global batch | ms/step | patches/s | speedup | efficiency | pipeline-fed ms/step "
              "| GPU idle |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        def cell(r, key, spec, scale=1.0, unit=""):  # "–" for what this run did not measure
            return f"{scale * r[key]:{spec}}{unit}" if key in r else "–"

        for r in rows:
            print(f"| {r['dtype']} | {r['devices']} | {r['global_batch']} | {r['median_ms']:.1f} | "
                  f"{r['patches_per_s']:.1f} | {cell(r, 'speedup', '.2f')} | {cell(r, 'efficiency', '.2f')} | "
                  f"{cell(r, 'pipeline_ms', '.1f')} | {cell(r, 'gpu_idle_fraction', '.0f', 100, '%')} |")
        print(f"wrote {write_result('bench_scaling' + (f'_{args.tag}' if args.tag else ''), payload)}")

    rows = []
    rng = np.random.default_rng(0)
    for r in runs:
        t0 = time.perf_counter()
        fn = r["lowered"].compile()
        compile_s = time.perf_counter() - t0
        print(f"{r['dtype']} {r['devices']} devices: compiled in {compile_s:.0f} s", flush=True)
        if staged is not None and sampler is None:
            sampler = pipeline.PatchSampler(staged.result(), "liver", config.data, 0, -1.0)
        mesh, batch = r["mesh"], r["global_batch"]
        sharding = batch_sharding(mesh)
        image = rng.normal(size=(batch, *patch, 1)).astype(np.float32)
        labels = (rng.random((batch, *patch)) < 0.1).astype(np.int32)
        arrays = {"image": jax.device_put(image, sharding), "label": jax.device_put(labels, sharding)}
        holder = {"state": r["init"]()}

        def fixed(fn=fn, holder=holder, arrays=arrays):
            holder["state"], holder["metrics"] = fn(holder["state"], arrays)

        timing = median_time(fixed, lambda h=holder: jax.block_until_ready(h["metrics"]), 3, args.steps)
        loss = float(holder["metrics"]["loss"])
        row = {"dtype": r["dtype"], "devices": r["devices"], "global_batch": batch, "compile_s": compile_s, **timing,
               "steps_per_s": 1e3 / timing["median_ms"], "patches_per_s": batch * 1e3 / timing["median_ms"],
               "loss": loss, "finite": bool(np.isfinite(loss)),
               "peak_gib": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30}
        if sampler is not None:
            dataset = pipeline.make_dataset(sampler, batch, args.steps + 3)
            batches = pipeline.batch_iterator(dataset, args.pipeline_workers, prefetch=4)
            for _ in range(3):  # warm-up: grain threads start, first reads
                holder["state"], holder["metrics"] = fn(holder["state"], pipeline.to_global_batch(next(batches),
                                                                                                   sharding))
            jax.block_until_ready(holder["metrics"])
            start = time.perf_counter()
            for _ in range(args.steps):
                holder["state"], holder["metrics"] = fn(holder["state"], pipeline.to_global_batch(next(batches),
                                                                                                   sharding))
            jax.block_until_ready(holder["metrics"])
            fed_ms = (time.perf_counter() - start) * 1e3 / args.steps
            row.update(pipeline_ms=fed_ms, pipeline_patches_per_s=batch * 1e3 / fed_ms,
                       gpu_idle_fraction=max(0.0, 1.0 - timing["median_ms"] / fed_ms))
        rows.append(row)
        print(f"{r['dtype']} {r['devices']} devices: {timing['median_ms']:.1f} ms/step, "
              f"{row['patches_per_s']:.1f} patches/s"
              + (f"; pipeline-fed {row['pipeline_ms']:.1f} ms/step" if "pipeline_ms" in row else ""), flush=True)
        del holder, arrays
        write_rows(rows)
    pool.shutdown()


if __name__ == "__main__":
    main()
