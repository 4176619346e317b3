"""Data-parallel training throughput on 1..N GPUs of one host at a fixed per-GPU batch (weak scaling).

    python experiments/bench_scaling.py [--devices 1,2] [--per-device-batch 2] [--patch 48,256,256]

The same jitted step as training (`livseg_jax.training.step`), batch sharded over a `data` mesh
axis, state replicated; the batch is already on the devices, so this measures compute plus the
gradient all-reduce, not the input pipeline. Efficiency = throughput(n) / (n * throughput(1)).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import enable_compilation_cache, environment, median_time, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--patch", default="48,256,256")
    parser.add_argument("--variant", default="elanres_msca_unet")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--overrides", default="depthwise_impl=shift")
    parser.add_argument("--features", default="")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    enable_compilation_cache()
    import jax

    from livseg_jax.config import base_config
    from livseg_jax.models import build_model
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import create_train_state
    from livseg_jax.training.step import (
        batch_sharding,
        jit_train_step,
        make_mesh,
        make_train_step,
        replicated,
    )

    config = base_config()
    config.model.name = args.variant
    config.model.dtype = args.dtype
    for item in filter(None, args.overrides.split(",")):
        key, value = item.split("=", 1)
        config.model[key] = value
    if args.features:
        config.model.features = tuple(int(v) for v in args.features.split(","))
    patch = tuple(int(v) for v in args.patch.split(","))
    model = build_model(config.model)
    optimizer = make_optimizer(config.optim, 100)
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(v) for v in args.devices.split(",")):
        if n > len(jax.devices()):
            print(f"skipping {n} devices: only {len(jax.devices())} present")
            continue
        mesh = make_mesh(jax.devices()[:n])
        batch = n * args.per_device_batch
        image = rng.normal(size=(batch, *patch, 1)).astype(np.float32)
        labels = (rng.random((batch, *patch)) < 0.1).astype(np.int32)
        arrays = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in (("image", image), ("label", labels))}
        state = jax.jit(lambda: create_train_state(model, optimizer, patch, 0), out_shardings=replicated(mesh))()
        step = jit_train_step(make_train_step(model, optimizer, config.loss, 100), mesh)
        holder = {"state": state}

        def one(step=step, holder=holder, arrays=arrays):
            holder["state"], holder["metrics"] = step(holder["state"], arrays)

        timing = median_time(one, lambda h=holder: jax.block_until_ready(h["metrics"]), 3, args.steps)
        loss = float(holder["metrics"]["loss"])
        row = {"devices": n, "global_batch": batch, **timing, "steps_per_s": 1e3 / timing["median_ms"],
               "patches_per_s": batch * 1e3 / timing["median_ms"], "loss": loss, "finite": bool(np.isfinite(loss))}
        rows.append(row)
        print(f"{n} devices: {timing['median_ms']:.1f} ms/step, {row['patches_per_s']:.1f} patches/s", flush=True)
        del holder, state, arrays
    base = next((r for r in rows if r["devices"] == 1), None)
    for r in rows:
        if base:
            r["speedup"] = r["patches_per_s"] / base["patches_per_s"]
            r["efficiency"] = r["speedup"] / r["devices"]
    payload = {"benchmark": "scaling", "patch": patch, "per_device_batch": args.per_device_batch,
               "model": config.model.to_dict(), "environment": environment(), "rows": rows}
    print("\n| GPUs | global batch | ms/step | patches/s | speedup | efficiency |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['devices']} | {r['global_batch']} | {r['median_ms']:.1f} | {r['patches_per_s']:.1f} | "
              f"{r.get('speedup', float('nan')):.2f} | {r.get('efficiency', float('nan')):.2f} |")
    print(f"wrote {write_result('bench_scaling' + (f'_{args.tag}' if args.tag else ''), payload)}")


if __name__ == "__main__":
    main()
