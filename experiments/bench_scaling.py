"""Data-parallel training throughput on 1..N GPUs of one host at a fixed per-GPU batch (weak scaling).

    python -m experiments.bench_scaling [--devices 1,2,4,8] [--dtypes bfloat16,float32]
        [--per-device-batch 2] [--patch 48,256,256] [--pipeline-cases 2]
        [--batch-norm global,per_device] [--latency-hiding] [--profile DIR]
    JAX_NUM_CPU_DEVICES=2 python -m experiments.bench_scaling --devices 1,2 --batch-norm global,per_device \
        --latency-hiding --variant unet --features 4,8 --overrides "" --patch 16,16,16 --steps 3 \
        --pipeline-cases 0 --profile /tmp/prof --tag cpu_smoke  # smoke: the plumbing on a CPU
    python -m experiments.bench_scaling --devices 1,2 --processes 2 ...  # also one process per GPU

The same jitted step as training (`livseg_jax.training.step`): batch sharded over a `data` mesh
axis, state replicated, XLA inserting the gradient all-reduce. Two measurements per GPU count:

- `fixed`: the batch is already on the devices: compute plus all-reduce. Two timings: `synced`
  waits for every step before dispatching the next (the host's dispatch and launch latency is in
  each step), `back_to_back` dispatches
  `--steps` steps and waits once, as the training loop does (it synchronises only to log), and
  divides: the throughput training sees.
- `pipeline`: batches come from the training input pipeline (grain, synthetic CT cases cached as in
  training, in-process workers) and are placed with `to_global_batch`, exactly as the training
  loop does. GPU idle fraction = 1 - fixed back-to-back / pipeline step time.

Variants side by side in one run (one compilation each): `--batch-norm` lists the values of
`train.batch_norm_stats` ("global": statistics synchronised over the devices; "per_device": each
device's own, no all-reduce inside the forward and backward passes), and `--latency-hiding` adds
each of them again compiled with `xla_gpu_enable_latency_hiding_scheduler=true` (a per-compilation
option: no restart; "+lhs" in the variant's name). On one device "per_device" is the "global" step
itself, so it is measured on more devices only and compared with the global 1-device row.
Every row counts the all-reduce operations in the compiled step.

`--profile DIR` traces `--profile-steps` back-to-back steps of each variant at every device count with
`jax.profiler` (DIR/<dtype>_<step variant>_<n>dev) and adds to the JSON, per device and step: time in
collective kernels (NCCL), busy time of the other kernels, the collective time no other kernel
overlaps (exposed), collective kernel launches, and the kernel kinds of
`experiments/profile_train_step.py`. A CPU trace holds no device kernels: those fields are 0 there.

`--processes N` adds the largest device count run as N processes of this host, each driving its own
share of the devices (one process per GPU, as `torchrun` runs PyTorch DDP), beside the same count
driven by one process (`experiments/scaling_processes.py`); every row says its `processes`.

Efficiency = throughput(n) / (n * throughput(1)), for each timing. The result file is rewritten after every
measured configuration, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import pathlib
import re
import sys
import tempfile
import time

import numpy as np

from experiments.bench_common import (
    apply_overrides,
    back_to_back_ms,
    enable_compilation_cache,
    environment,
    median_time,
    parse_overrides,
    write_result,
)
from experiments.profile_train_step import (
    device_threads,
    hlo_op_names,
    is_kernel_line,
    kernel_kind,
    read_trace,
    summarise,
)
from livseg_jax.atomic_write import write_json
from livseg_jax.config import BATCH_NORM_STATS

LATENCY_HIDING = {"xla_gpu_enable_latency_hiding_scheduler": True}


def step_variants(batch_norm: str, latency_hiding: bool) -> list[tuple[str, str, dict]]:
    """Returns (name, train.batch_norm_stats, XLA compile options) of every variant to measure."""
    names = [v for v in batch_norm.split(",") if v]
    unknown = [v for v in names if v not in BATCH_NORM_STATS]
    if unknown or not names:
        raise SystemExit(f"--batch-norm {batch_norm!r}: use a comma-separated list of {BATCH_NORM_STATS}")
    variants = [(v, v, {}) for v in names]
    if latency_hiding:
        variants += [(f"{v}+lhs", v, dict(LATENCY_HIDING)) for v in names]
    return variants


def all_reduce_count(hlo_text: str) -> int:
    """Returns how many all-reduce operations (synchronous, or started asynchronously) an HLO module runs."""
    return len(re.findall(r" all-reduce(?:-start)?\(", hlo_text))


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Returns the union of (start, end) intervals as sorted disjoint intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlap_length(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Returns the total length two lists of sorted disjoint intervals share."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def collective_overlap(events: list[dict], steps: int) -> dict:
    """Returns per device and step (mean over devices): ms in collective kernels, busy ms of the other
    kernels, collective ms that no other kernel overlaps, collective kernel launches, and the span
    from the first kernel's start to the last one's end (the span less the other kernels' busy time
    and the exposed collective time is the time with no kernel running)."""
    device_pids, thread = device_threads(events)
    kernels: dict = collections.defaultdict(lambda: {"collective": [], "compute": []})
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        if not is_kernel_line(thread.get((e["pid"], e.get("tid")), "")):
            continue
        start = float(e["ts"]) / 1e3  # the trace's times are microseconds
        kind = "collective" if kernel_kind(e["name"]) == "collective" else "compute"
        kernels[e["pid"]][kind].append((start, start + float(e.get("dur", 0)) / 1e3))
    rows = []
    for device in kernels.values():
        collective, compute = merge_intervals(device["collective"]), merge_intervals(device["compute"])
        busy = sum(end - start for start, end in collective)
        rows.append({"collective_ms_per_step": busy / steps,
                     "compute_busy_ms_per_step": sum(end - start for start, end in compute) / steps,
                     "exposed_collective_ms_per_step": (busy - overlap_length(collective, compute)) / steps,
                     "collective_kernels_per_step": len(device["collective"]) / steps,
                     "span_ms_per_step": (max(i[1] for i in collective + compute)
                                          - min(i[0] for i in collective + compute)) / steps})
    keys = ("collective_ms_per_step", "compute_busy_ms_per_step", "exposed_collective_ms_per_step",
            "collective_kernels_per_step", "span_ms_per_step")
    return {"devices_traced": len(rows), **{k: float(np.mean([r[k] for r in rows])) if rows else 0.0 for k in keys}}


def add_speedups(rows: list[dict]) -> None:
    """Adds each row's speed-up and efficiency against the 1-device row of the same dtype and compile
    options ("per_device" on one device is "global"), for both timings."""
    for row in rows:
        base = next((b for b in rows if b["devices"] == 1 and b["dtype"] == row["dtype"]
                     and b["compile_options"] == row["compile_options"]
                     and b["batch_norm_stats"] in (row["batch_norm_stats"], "global")), None)
        if base:
            row["speedup"] = row["patches_per_s"] / base["patches_per_s"]
            row["efficiency"] = row["speedup"] / row["devices"]
            row["back_to_back_speedup"] = base["back_to_back_ms"] * row["devices"] / row["back_to_back_ms"]
            row["back_to_back_efficiency"] = row["back_to_back_speedup"] / row["devices"]


def print_rows(rows: list[dict], profiles: list[dict]) -> None:
    """Prints the rows as a Markdown table, then one line per profile."""
    print("\n| dtype | step variant | GPUs | processes | global batch | all-reduces | ms/step | patches/s | speedup | "
          "efficiency | back-to-back ms/step | speedup | efficiency | pipeline-fed ms/step | GPU idle |"
          "\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(r, key, spec, scale=1.0, unit=""):  # "–" for what this run did not measure
        return f"{scale * r[key]:{spec}}{unit}" if key in r else "–"

    for r in rows:
        print(f"| {r['dtype']} | {r['step_variant']} | {r['devices']} | {r.get('processes', 1)} | "
              f"{r['global_batch']} | "
              f"{r['all_reduce_ops']} | {r['median_ms']:.1f} | "
              f"{r['patches_per_s']:.1f} | {cell(r, 'speedup', '.2f')} | {cell(r, 'efficiency', '.2f')} | "
              f"{r['back_to_back_ms']:.1f} | {cell(r, 'back_to_back_speedup', '.2f')} | "
              f"{cell(r, 'back_to_back_efficiency', '.2f')} | "
              f"{cell(r, 'pipeline_ms', '.1f')} | {cell(r, 'gpu_idle_fraction', '.0f', 100, '%')} |")
    for p in profiles:
        print(f"profile {p['dtype']} {p['step_variant']} x{p['devices']}: {p['all_reduce_ops']} all-reduces, "
              f"collectives {p['collective_ms_per_step']:.2f} ms/step ({p['exposed_collective_ms_per_step']:.2f}"
              f" ms exposed), other kernels busy {p['compute_busy_ms_per_step']:.2f} of "
              f"{p['span_ms_per_step']:.2f} ms/step, per device")


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
    parser.add_argument("--batch-norm", default="global",
                        help=f"train.batch_norm_stats values to compare, comma-separated: {BATCH_NORM_STATS}")
    parser.add_argument("--latency-hiding", action="store_true",
                        help="add each --batch-norm variant compiled with XLA's latency hiding scheduler")
    parser.add_argument("--profile", default="", help="trace each variant at every device count here")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--processes", type=int, default=1,
                        help="also measure the largest --devices count as this many processes on this host, each "
                             "with its own share of the devices (one process per GPU, as torchrun runs DDP)")
    parser.add_argument("--rows-to", default="", help=argparse.SUPPRESS)  # a `--processes` child's result
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    variants = step_variants(args.batch_norm, args.latency_hiding)
    if args.processes > 1 and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        from experiments.scaling_processes import launch

        launch(args, sys.argv[1:])  # children measure; nothing here may start a backend
        return
    from livseg_jax.training.distributed import maybe_initialize_distributed

    # A `--processes` child (JAX_COORDINATOR_ADDRESS and the rest set) compiles without the persistent
    # cache, as `train` does with several processes: JAX writes entries from process 0 only, so a
    # rerun would find process 0 loading the step while the others compile it (livseg_jax/train.py).
    if not maybe_initialize_distributed():
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
    if jax.process_count() > 1:  # every process takes part in every step: the count of all their devices only
        counts = [n for n in counts if n == jax.device_count()]
        args.pipeline_cases, args.profile = 0, ""  # the one-process run measures those

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
        for (variant, batch_norm_stats, options), n in ((v, n) for v in variants for n in counts):
            if n == 1 and batch_norm_stats == "per_device":
                continue  # the global step itself (make_train_step): its row is the global one
            mesh = make_mesh(jax.devices()[:n])
            batch = n * args.per_device_batch
            init = jax.jit(lambda model=model: create_train_state(model, optimizer, 0),
                           out_shardings=replicated(mesh))
            abstract_state = jax.eval_shape(init)
            abstract_state = jax.tree.map(lambda a, m=mesh: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                                 sharding=replicated(m)),
                                          abstract_state)
            abstract_batch = {
                "image": jax.ShapeDtypeStruct((batch, *patch, 1), np.float32, sharding=batch_sharding(mesh)),
                "label": jax.ShapeDtypeStruct((batch, *patch), np.int32, sharding=batch_sharding(mesh)),
            }
            step = jit_train_step(make_train_step(model, optimizer, config.loss, 100, None, batch_norm_stats, mesh),
                                  mesh)
            runs.append({"dtype": dtype, "step_variant": variant, "batch_norm_stats": batch_norm_stats,
                         "compile_options": options, "devices": n, "global_batch": batch, "mesh": mesh,
                         "init": init, "lowered": step.lower(abstract_state, abstract_batch),
                         "model": model_config.to_dict()})

    # The synthetic cases are built in a thread while the step functions compile. Compilation is
    # sequential: on a 4x H200 host, three 48x256x256 steps compiled in parallel threads had not
    # finished after 400 s, while one compiles in about 150 s (docs/benchmarks.md).
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    staged = pool.submit(build_pipeline_cases, args, config) if args.pipeline_cases else None
    sampler = None

    def write_rows(rows: list[dict]) -> None:
        """Adds speed-up and efficiency, writes the result file (after every row: partial runs count)."""
        add_speedups(rows)
        payload = {"benchmark": "scaling", "patch": list(patch), "per_device_batch": args.per_device_batch,
                   "steps": args.steps,
                   "variant": args.variant, "overrides": args.overrides,
                   "step_variants": {name: {"batch_norm_stats": bn, "compile_options": options}
                                     for name, bn, options in variants},
                   "pipeline": {"cases": args.pipeline_cases, "raw_shape": args.pipeline_shape,
                                "workers": args.pipeline_workers},
                   "skipped_device_counts": skipped, "models": {r["dtype"]: r["model"] for r in runs},
                   "environment": environment(), "rows": rows, "profiles": profiles}
        if jax.process_index():
            return  # process 0 reports for all
        if args.rows_to:  # a child of `--processes`: its launcher merges and writes the result
            write_json(pathlib.Path(args.rows_to), payload)
            return
        print_rows(rows, profiles)
        print(f"wrote {write_result('bench_scaling' + (f'_{args.tag}' if args.tag else ''), payload)}")

    rows: list[dict] = []
    profiles: list[dict] = []
    rng = np.random.default_rng(0)
    for r in runs:
        label = f"{r['dtype']} {r['step_variant']} {r['devices']} devices"
        t0 = time.perf_counter()
        try:
            fn = r["lowered"].compile(compiler_options=r["compile_options"] or None)
        except jax.errors.JaxRuntimeError as err:
            if "No such compile option" not in str(err):
                raise
            print(f"{label}: skipped, this jaxlib lacks a compile option: {err}", flush=True)
            continue
        compile_s = time.perf_counter() - t0
        print(f"{label}: compiled in {compile_s:.0f} s", flush=True)
        if staged is not None and sampler is None:
            sampler = pipeline.PatchSampler(staged.result(), "liver", config.data, 0, -1.0)
        mesh, batch = r["mesh"], r["global_batch"]
        sharding = batch_sharding(mesh)
        image = rng.normal(size=(batch, *patch, 1)).astype(np.float32)
        labels = (rng.random((batch, *patch)) < 0.1).astype(np.int32)
        # Each process places its own devices' shards (the same seed gives every process the same batch).
        arrays = {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
                  for k, v in (("image", image), ("label", labels))}
        holder = {"state": r["init"]()}

        def fixed(fn=fn, holder=holder, arrays=arrays):
            holder["state"], holder["metrics"] = fn(holder["state"], arrays)

        def sync(holder=holder):
            jax.block_until_ready(holder["metrics"])

        timing = median_time(fixed, sync, 3, args.steps)
        timing.update(back_to_back_ms(fixed, sync, args.steps))
        loss = float(holder["metrics"]["loss"])
        hlo_text = fn.as_text()
        row = {"dtype": r["dtype"], "step_variant": r["step_variant"], "batch_norm_stats": r["batch_norm_stats"],
               "compile_options": r["compile_options"], "devices": r["devices"], "processes": jax.process_count(),
               "global_batch": batch,
               "compile_s": compile_s, "all_reduce_ops": all_reduce_count(hlo_text), **timing,
               "steps_per_s": 1e3 / timing["median_ms"], "patches_per_s": batch * 1e3 / timing["median_ms"],
               "loss": loss, "finite": bool(np.isfinite(loss)),
               "peak_gib": (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30}
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
                       gpu_idle_fraction=max(0.0, 1.0 - timing["back_to_back_ms"] / fed_ms))
        if args.profile:
            trace_dir = pathlib.Path(args.profile, f"{r['dtype']}_{r['step_variant']}_{r['devices']}dev")
            with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                for _ in range(args.profile_steps):
                    fixed()
                jax.block_until_ready(holder["metrics"])
            events = read_trace(trace_dir)
            kinds = summarise(events, args.profile_steps * r["devices"], 2, hlo_op_names(hlo_text))["by_kind"]
            profiles.append({"dtype": r["dtype"], "step_variant": r["step_variant"], "devices": r["devices"],
                             "steps": args.profile_steps, "trace_dir": str(trace_dir),
                             "all_reduce_ops": row["all_reduce_ops"], **collective_overlap(events, args.profile_steps),
                             "by_kind_ms_per_step_per_device": kinds})
        rows.append(row)
        print(f"{label}: {timing['median_ms']:.1f} ms/step, "
              f"{row['patches_per_s']:.1f} patches/s, back to back {timing['back_to_back_ms']:.1f} ms/step"
              + (f"; pipeline-fed {row['pipeline_ms']:.1f} ms/step" if "pipeline_ms" in row else ""), flush=True)
        del holder, arrays
        write_rows(rows)
    pool.shutdown()


if __name__ == "__main__":
    main()
