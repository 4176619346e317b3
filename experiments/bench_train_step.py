"""Train-step time and peak memory: JAX (float32, bf16) against the PyTorch twins (eager float32,
eager AMP bf16 channels_last_3d, torch.compile), same weights, same data.

    python -m experiments.bench_train_step --variants elanres_msca_unet \
        --modes jax_bf16,torch_amp,torch_compile [--patch 48,256,256 --batch 2 --steps 20]

A step is forward + backward + Adam with HybridLoss1 and deep supervision (SPEC 2). Each
(variant, mode) runs in its own process so the frameworks' allocators never share the GPU.
Two timings per row, the same for both frameworks: `median_ms`, each step waited for before the
next (dispatch and launch latency included), and `back_to_back_ms`, `--steps` steps dispatched
without waiting, then one wait (the throughput a training loop gets, which waits only to log).
`--step-programs 2` (or 3) times the JAX step as `train`'s first steps run it on a GPU: two programs,
gradients and update (or forward, backward, update; `livseg_jax/training/step_programs.py`); the
default 1 is the one program `train` switches to once it has compiled, and runs from then on.
Writes experiments/results/bench_train_step[_TAG].json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from experiments.bench_common import (
    apply_overrides,
    back_to_back_ms,
    enable_compilation_cache,
    median_time,
    parse_overrides,
    print_result,
    run_child,
    write_result,
)

MODES = ("jax_f32", "jax_bf16", "torch_f32", "torch_amp", "torch_compile")


def make_data(batch: int, patch: tuple[int, ...], seed: int = 0):
    """Returns (image (B, D, H, W, 1) float32, labels (B, D, H, W) int32): noise with a blob."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, *patch, 1)).astype(np.float32)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in patch], indexing="ij")
    blob = (sum(g**2 for g in grids) < 0.3).astype(np.int32)
    image = (image + blob[None, ..., None]).astype(np.float32)
    return image, np.broadcast_to(blob, (batch, *patch)).copy()


OVERRIDES: dict[str, str] = {}  # model config overrides from --overrides, e.g. depthwise_impl=shift


def model_config(variant: str, dtype: str):
    from livseg_jax.config import model_config as base

    cfg = base(variant)
    cfg.dtype = dtype
    return apply_overrides(cfg, OVERRIDES)


def lower_jax_step(variant: str, mode: str, patch, batch: int, programs: int = 1):
    """The JAX train step of `mode` lowered for one device, as `programs` programs (`--step-programs`):
    (lowered, state, batch arrays)."""
    import jax
    import ml_collections

    from livseg_jax.config import base_config
    from livseg_jax.models import build_model
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import create_train_state
    from livseg_jax.training.step import jit_train_step, make_mesh, make_train_step, replicated

    cfg = model_config(variant, "bfloat16" if mode == "jax_bf16" else "float32")
    model = build_model(cfg)
    optimizer = make_optimizer(ml_collections.ConfigDict(base_config().optim), 100)
    mesh = make_mesh(jax.devices()[:1])
    # Created with the step's state sharding so that the second step does not recompile.
    state = jax.jit(lambda: create_train_state(model, optimizer, 0), out_shardings=replicated(mesh))()
    step = jit_train_step(make_train_step(model, optimizer, base_config().loss, 100), mesh,
                          programs=programs)
    image, labels = make_data(batch, patch)
    batch_arrays = {"image": jax.device_put(image), "label": jax.device_put(labels)}
    return step.lower(state, batch_arrays), state, batch_arrays


def run_jax(variant: str, mode: str, patch, batch: int, steps: int, programs: int = 1) -> dict:
    import jax

    from experiments.roofline import device_peaks, roofline, step_cost

    enable_compilation_cache()
    t0 = time.perf_counter()
    lowered, state, batch_arrays = lower_jax_step(variant, mode, patch, batch, programs)
    compiled = lowered.compile()  # ahead of time, so the cost analysis is of the timed program
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    step = compiled

    def one():
        holder["state"], holder["metrics"] = step(holder["state"], batch_arrays)

    def sync():
        jax.block_until_ready(holder["metrics"])

    timing = median_time(one, sync, 3, steps)
    timing.update(back_to_back_ms(one, sync, steps))
    loss = float(holder["metrics"]["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    cost = step_cost(lowered, compiled)
    small = jax.devices()[0].platform == "cpu"  # keeps a CPU smoke run short
    peaks = device_peaks(1024 if small else 8192, 64 if small else 1024)
    dtype = "bfloat16" if mode == "jax_bf16" else "float32"
    return {**timing, "first_step_s": compile_s, "loss": loss, "finite": bool(np.isfinite(loss)),
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "cost": cost, "device_peaks": peaks,
            "roofline": roofline(cost, peaks, dtype, timing["median_ms"])}


def run_torch(variant: str, mode: str, patch, batch: int, steps: int) -> dict:
    import torch

    from livseg_jax.config import base_config
    from livseg_jax.interop.torch_models import torch_model_from_config
    from tools.torch_losses import deep_supervision_loss_torch

    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    model = torch_model_from_config(model_config(variant, "float32")).to(device)
    image, labels = make_data(batch, patch)
    x = torch.from_numpy(image).permute(0, 4, 1, 2, 3).contiguous().to(device)
    y = torch.from_numpy(labels).long().to(device)
    if mode in ("torch_amp", "torch_compile"):
        # channels_last_3d applies to 5-D tensors only (MSCA's slice-trick convs are 2-D).
        for p in model.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_config = base_config().loss
    model.train()

    def step_fn(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode != "torch_f32"):
            outs = model(x)
        total, _ = deep_supervision_loss_torch([o.float() for o in outs], y, loss_config, 0.4)
        total.backward()
        optimizer.step()
        return total

    fn = torch.compile(step_fn) if mode == "torch_compile" else step_fn
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = fn(x, y)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    holder = {}

    def one():
        holder["loss"] = fn(x, y)

    timing = median_time(one, torch.cuda.synchronize, 3, steps)
    timing.update(back_to_back_ms(one, torch.cuda.synchronize, steps))
    loss = float(holder["loss"])
    return {**timing, "first_step_s": compile_s, "loss": loss, "finite": bool(np.isfinite(loss)),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_case(variant: str, mode: str, patch, batch: int, steps: int, programs: int = 1) -> dict:
    if mode.startswith("jax"):
        return run_jax(variant, mode, patch, batch, steps, programs)
    return run_torch(variant, mode, patch, batch, steps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="elanres_msca_unet")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--patch", default="48,256,256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tag", default="")
    parser.add_argument("--overrides", default="", help="model config overrides, e.g. depthwise_impl=shift")
    parser.add_argument("--step-programs", type=int, default=1, choices=(1, 2, 3),
                        help="the JAX step as one program, or as train's first steps' parts (2: gradients, update)")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)  # child process: variant:mode
    args = parser.parse_args()
    patch = tuple(int(v) for v in args.patch.split(","))
    OVERRIDES.update(parse_overrides(args.overrides))
    if args.case:
        variant, mode = args.case.split(":")
        result = run_case(variant, mode, patch, args.batch, args.steps, args.step_programs)
        print_result(result)
        return

    rows = []
    name = "bench_train_step" + (f"_{args.tag}" if args.tag else "")

    def save():  # after every row, so a run cut off by a time limit keeps what it measured
        # The children report the environment: importing jax here would claim the GPU's memory.
        env = next((r["environment"] for r in rows if "environment" in r), {})
        payload = {"benchmark": "train_step", "overrides": OVERRIDES, "step_programs": args.step_programs,
                   "patch": patch,
                   "batch": args.batch, "steps": args.steps, "environment": env, "rows": rows}
        return write_result(name, payload)

    for variant in args.variants.split(","):
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
            row = {"variant": variant, "mode": mode, **run_child("experiments.bench_train_step", [
                "--case", f"{variant}:{mode}", "--patch", args.patch, "--batch", str(args.batch),
                "--steps", str(args.steps), "--overrides", args.overrides,
                "--step-programs", str(args.step_programs)])}
            rows.append(row)
            path = save()
            if "median_ms" in row:
                text = (f"{row['median_ms']:8.1f} ms  back to back {row['back_to_back_ms']:8.1f} ms  "
                        f"peak {row['peak_gib']:.1f} GiB  "
                        f"first step {row['first_step_s']:.0f} s  loss {row['loss']:.4f}")
            else:
                text = "ERROR " + row["error"][-400:]
            print(f"{variant:18s} {mode:14s} {text}", flush=True)
    print("\n| variant | mode | each step alone, ms | back to back, ms | torch.compile / this, back to back "
          "| peak GiB | first step s |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "median_ms" in r:
            base = next((b for b in rows if b["variant"] == r["variant"] and b["mode"] == "torch_compile"
                         and "back_to_back_ms" in b), None)
            ratio = f"{base['back_to_back_ms'] / r['back_to_back_ms']:.2f}x" if base else "–"
            print(f"| {r['variant']} | {r['mode']} | {r['median_ms']:.1f} | {r['back_to_back_ms']:.1f} | {ratio} | "
                  f"{r['peak_gib']:.1f} | {r['first_step_s']:.0f} |")
        else:
            print(f"| {r['variant']} | {r['mode']} | error | | | | |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
