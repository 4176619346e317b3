"""What the device augmentation (livseg_jax/data/augment_device.py) adds to the train step.

    python -m experiments.bench_augment [--patch 48,256,256 --batch 2 --steps 20 --tag h200]
    python -m experiments.bench_augment --smoke      # CPU check: tiny network and patch, 2 steps

The network and its computation forms are the training run's (the paper's elanres_msca_unet,
float32, forms "auto" with the XLA flags `livseg_jax.train` adds). Modes, each in its own
process (so that peak memory is its own):
- `off`: the plain step on patches (what `data.augment.device=False` runs);
- `device`: the step on regions (patch + the margin derived from nnU-Net's default ranges) with
  the default set (elastic deformation off, as nnU-Net v2);
- `device_elastic`: the same with elastic deformation on (p 0.2), whose field (three FFTs of
  the patch) is compiled in only when its probability is above 0;
- `augment_only`: the augmentation alone, jitted, on the region batch;
- `host_crop`: the host's side, no device: cutting a patch and a region out of a memory-mapped
  LiTS-sized preprocessed volume (300x256x256, float32) at random centres, per example.
Every transform is computed for every example and selected by its flag, so the time does not
depend on the probabilities (elastic aside). Also recorded per mode: the host-to-device copy of
the batch (regions are larger than patches). Writes experiments/results/bench_augment[_TAG].json
with the overhead of each device mode over `off`, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from experiments.bench_common import (
    enable_compilation_cache,
    median_time,
    print_result,
    run_child,
    write_result,
)

MODES = ("off", "device", "device_elastic", "augment_only", "host_crop")
SMOKE = {"patch": "16,32,32", "batch": 2, "steps": 2, "features": (4, 8, 8, 8, 8), "model": "unet"}


def make_config(mode: str, patch, smoke: bool):
    """Returns the run config of `mode`: the paper's network (a tiny U-Net for --smoke), device
    augmentation on for the device modes."""
    from livseg_jax.config import base_config

    config = base_config()
    config.data.patch_size = tuple(patch)
    if smoke:
        config.model.features, config.model.name = SMOKE["features"], SMOKE["model"]
    config.data.augment.device = mode != "off"
    if mode == "device_elastic":
        config.data.augment.transforms.p_elastic = 0.2
    return config


def make_batch(batch: int, shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image (B, *shape, 1) float32, labels (B, *shape) int32): noise with a blob."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = (sum(g**2 for g in grids) < 0.3).astype(np.int32)
    image = rng.normal(size=(batch, *shape, 1)).astype(np.float32) + blob[None, ..., None]
    return image.astype(np.float32), np.broadcast_to(blob, (batch, *shape)).copy()


def run_case(mode: str, patch, batch: int, steps: int, smoke: bool) -> dict:
    """Times one mode in this process; returns its row."""
    from livseg_jax.xla_flags import apply_model_xla_flags

    config = make_config(mode, patch, smoke)
    apply_model_xla_flags([config.model])  # as `livseg_jax.train` does, before JAX starts

    import jax

    from livseg_jax.data.augment_device import augment_batch, device_augment_settings
    from livseg_jax.models import build_model
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import create_train_state
    from livseg_jax.training.step import jit_train_step, make_mesh, make_train_step, replicated

    enable_compilation_cache()
    settings = device_augment_settings(config.data)
    if mode == "host_crop":
        return host_crop(tuple(patch), device_augment_settings(make_config("device", patch, smoke).data).region,
                         max(steps, 5))
    shape = settings.region if settings is not None else tuple(patch)
    image, labels = make_batch(batch, shape)
    t0 = time.perf_counter()
    arrays = {"image": jax.device_put(image), "label": jax.device_put(labels)}
    jax.block_until_ready(arrays)
    row = {"mode": mode, "batch_shape": list(image.shape), "first_h2d_ms": (time.perf_counter() - t0) * 1e3,
           "margin": list(settings.margin) if settings is not None else [0, 0, 0]}
    row.update({f"h2d_{k}": v for k, v in median_time(
        lambda: arrays.update(copy=jax.device_put(image)), lambda: jax.block_until_ready(arrays["copy"]),
        1, 5).items() if k != "times_ms"})
    arrays.pop("copy")

    if mode == "augment_only":
        fn = jax.jit(lambda k, x, y: augment_batch(k, x, y, settings))
        holder = {"i": 0}

        def one():
            holder["i"] += 1
            holder["out"] = fn(jax.random.key(holder["i"]), arrays["image"], arrays["label"])

        t0 = time.perf_counter()
        one()
        jax.block_until_ready(holder["out"])
        first = time.perf_counter() - t0
        timing = median_time(one, lambda: jax.block_until_ready(holder["out"]), 3, steps)
        return {**row, **timing, "first_step_s": first, "peak_gib": _peak_gib()}

    model = build_model(config.model)
    optimizer = make_optimizer(config.optim, 100)
    mesh = make_mesh(jax.devices()[:1])
    state = jax.jit(lambda: create_train_state(model, optimizer, 0), out_shardings=replicated(mesh))()
    step = jit_train_step(make_train_step(model, optimizer, config.loss, 100, settings), mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, arrays)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    holder = {"state": state}

    def one():  # the state advances: every step draws new augmentation parameters
        holder["state"], holder["metrics"] = step(holder["state"], arrays)

    timing = median_time(one, lambda: jax.block_until_ready(holder["metrics"]), 3, steps)
    loss = float(holder["metrics"]["loss"])
    return {**row, **timing, "first_step_s": first, "loss": loss, "finite": bool(np.isfinite(loss)),
            "peak_gib": _peak_gib()}


def host_crop(patch, region, repeats: int) -> dict:
    """Returns the median ms of `crop_patch` (the PatchSampler's copy) for the patch and the region."""
    import pathlib
    import tempfile

    from livseg_jax.data.pipeline import crop_patch

    shape = (300, 256, 256)
    path = pathlib.Path(tempfile.mkdtemp()) / "volume.npy"
    np.save(path, np.random.default_rng(0).normal(size=shape).astype(np.float32))
    volume = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(1)
    row = {"mode": "host_crop", "volume_shape": list(shape), "batch_shape": [1, *region, 1]}
    for name, size in (("patch", patch), ("region", region)):
        starts = [[int(rng.integers(n)) - s // 2 for n, s in zip(shape, size, strict=True)] for _ in range(repeats)]
        times = []
        for start in starts:
            t0 = time.perf_counter()
            crop_patch(volume, start, size, -1.0)
            times.append((time.perf_counter() - t0) * 1e3)
        row[f"{name}_ms"] = float(np.median(times))
    path.unlink()
    row["median_ms"] = row["region_ms"]
    return row


def _peak_gib() -> float:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--patch", default="48,256,256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tag", default="")
    parser.add_argument("--smoke", action="store_true", help="tiny network and patch, 2 steps (a CPU check)")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)  # child process: the mode
    args = parser.parse_args()
    if args.smoke:
        args.patch, args.batch, args.steps = SMOKE["patch"], SMOKE["batch"], SMOKE["steps"]
        args.tag = args.tag or "smoke"
    patch = tuple(int(v) for v in args.patch.split(","))
    if args.case:
        row = run_case(args.case, patch, args.batch, args.steps, args.smoke)
        print_result(row)
        return

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {MODES}")
    name = "bench_augment" + (f"_{args.tag}" if args.tag else "")
    rows = []

    def save():  # after every row, so a run cut off by a time limit keeps what it measured
        env = next((r["environment"] for r in rows if "environment" in r), {})
        base = next((r for r in rows if r["mode"] == "off" and "median_ms" in r), None)
        for r in rows:  # device modes: added fraction; augment_only: its time as a fraction of off
            if base is not None and "median_ms" in r and r["mode"] not in ("off", "host_crop"):
                key = "share_of_off" if r["mode"] == "augment_only" else "overhead_vs_off"
                r[key] = r["median_ms"] / base["median_ms"] - (key == "overhead_vs_off")
        payload = {"benchmark": "augment", "patch": patch, "batch": args.batch, "steps": args.steps,
                   "network": "smoke: unet (4, 8, 8, 8, 8)" if args.smoke else "paper: elanres_msca_unet",
                   "environment": env, "rows": rows}
        return write_result(name, payload)

    for mode in modes:
        row = {"mode": mode, **run_child("experiments.bench_augment", [
            "--case", mode, "--patch", args.patch, "--batch", str(args.batch), "--steps", str(args.steps),
            *(["--smoke"] if args.smoke else [])])}
        rows.append(row)
        path = save()
        if mode == "host_crop" and "median_ms" in row:
            text = f"host crop: patch {row['patch_ms']:.1f} ms, region {row['region_ms']:.1f} ms per example"
        elif "median_ms" in row:
            text = (f"{row['median_ms']:8.1f} ms  peak {row['peak_gib']:.1f} GiB  h2d {row['h2d_median_ms']:.1f} ms  "
                    f"first step {row['first_step_s']:.0f} s")
        else:
            text = "ERROR " + row["error"][-400:]
        print(f"{mode:15s} {text}", flush=True)
    print("\n| mode | batch shape | median ms | vs off | h2d ms | peak GiB |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r["mode"] == "host_crop" and "median_ms" in r:
            print(f"| host_crop (per example) | {'x'.join(map(str, r['batch_shape'][1:4]))} | {r['region_ms']:.1f} "
                  f"(patch {r['patch_ms']:.1f}) | | | |")
        elif "median_ms" in r:
            share = (f"{100 * r['overhead_vs_off']:+.1f}%" if "overhead_vs_off" in r
                     else f"{100 * r['share_of_off']:.1f}% of off" if "share_of_off" in r else "")
            print(f"| {r['mode']} | {'x'.join(map(str, r['batch_shape']))} | {r['median_ms']:.1f} | {share} | "
                  f"{r['h2d_median_ms']:.1f} | {r['peak_gib']:.1f} |")
        else:
            print(f"| {r['mode']} | error | | | | |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
