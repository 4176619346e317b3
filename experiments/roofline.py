"""Roofline terms for a compiled JAX step: its FLOPs and bytes (XLA cost analysis) against the
device's measured peak matmul rate and memory bandwidth.

    python -m experiments.roofline experiments/results/bench_train_step_h100_side_by_side_v2.json

As a script it completes a `bench_train_step` result on the CPU: XLA's GPU cost analysis does not
count the FLOPs of cuDNN convolutions, so the model's FLOPs come from the traced program (the
same on every backend), and each row gets its compute bound at the device's measured matmul peak
(bf16 for the bf16 / AMP / compile modes, the float32 rate, which is TF32 on an H100, otherwise).
Writes results/roofline_<name>.json and prints a Markdown table.

The lower bound `max(flops / peak_flops, bytes / bandwidth)` says what a step could take at best
on this device; the ratio of the measured time to it says how much room the kernels leave.
"""

from __future__ import annotations

import argparse
import json
import os
import time

if __name__ == "__main__":  # the report only traces programs: no accelerator needed
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp


def _median_seconds(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def device_peaks(matmul_size: int = 8192, copy_mib: int = 1024) -> dict:
    """Measures this device's dense matmul rate (bf16 and float32) and its memory bandwidth."""
    peaks = {}
    key = jax.random.key(0)
    for dtype in ("bfloat16", "float32"):
        a = jax.random.normal(key, (matmul_size, matmul_size), dtype)
        seconds = _median_seconds(jax.jit(jnp.matmul), a, a)
        peaks[f"matmul_{dtype}_tflops"] = 2 * matmul_size**3 / seconds / 1e12
    x = jnp.ones((copy_mib * 2**20 // 4,), jnp.float32)
    seconds = _median_seconds(jax.jit(lambda v: v * 2.0 + 1.0), x)
    peaks["bandwidth_gbps"] = 2 * x.nbytes / seconds / 1e9  # one read and one write
    return peaks


def _cost(analysis) -> dict:
    # Older jax returns a list with one dict per computation.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def step_cost(lowered, compiled) -> dict:
    """FLOPs counted on the traced program (convolutions included, before any fusion) and bytes
    moved by the optimised one (after fusion, which is what the memory sees)."""
    before = _cost(lowered.cost_analysis())
    after = _cost(compiled.cost_analysis())
    return {"flops": float(before.get("flops", 0.0)),
            "bytes_accessed": float(after.get("bytes accessed", 0.0)),
            "flops_after_optimisation": float(after.get("flops", 0.0))}


def roofline(cost: dict, peaks: dict, dtype: str, measured_ms: float) -> dict:
    """Lower bounds in ms from compute and from memory, and how far the measured step is above
    the larger of the two."""
    compute_ms = cost["flops"] / (peaks[f"matmul_{dtype}_tflops"] * 1e12) * 1e3
    memory_ms = cost["bytes_accessed"] / (peaks["bandwidth_gbps"] * 1e9) * 1e3
    bound_ms = max(compute_ms, memory_ms)
    return {"compute_bound_ms": compute_ms, "memory_bound_ms": memory_ms,
            "bound_ms": bound_ms, "measured_over_bound": measured_ms / bound_ms if bound_ms else None}


BF16_MODES = ("jax_bf16", "torch_amp", "torch_compile")


def model_flops(bench, variant: str, mode: str, patch, batch: int) -> tuple[float, float]:
    """FLOPs of one train step, counted on the traced (unoptimised) program: (the model's, the
    program's). They differ when width-packed convolutions (`dense_pack_channels`) multiply
    zeros: the compute bound uses the model's count, the work the step has to do."""
    program = float(_cost(bench.lower_jax_step(variant, mode, patch, batch)[0].cost_analysis()).get("flops", 0.0))
    if not int(bench.OVERRIDES.get("dense_pack_channels", 0) or 0):
        return program, program
    saved = dict(bench.OVERRIDES)
    bench.OVERRIDES["dense_pack_channels"] = "0"
    try:
        model = float(_cost(bench.lower_jax_step(variant, mode, patch, batch)[0].cost_analysis()).get("flops", 0.0))
    finally:
        bench.OVERRIDES.clear()
        bench.OVERRIDES.update(saved)
    return model, program


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="bench_train_step JSON files")
    args = parser.parse_args()
    from experiments import bench_train_step as bench
    from experiments.bench_common import write_result

    print("| file | mode | median ms | TFLOP/step | compute bound ms | memory bound ms | x bound |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for path in args.results:
        result = json.loads(open(path).read())
        bench.OVERRIDES.clear()
        bench.OVERRIDES.update(result.get("overrides") or {})
        peaks = next((r["device_peaks"] for r in result["rows"] if "device_peaks" in r), None)
        if peaks is None:
            raise SystemExit(f"{path}: no row carries device_peaks; rerun bench_train_step.py")
        flops_by_dtype = {}
        rows = []
        for row in result["rows"]:
            if "median_ms" not in row:
                continue
            dtype = "bfloat16" if row["mode"] in BF16_MODES else "float32"
            jax_mode = "jax_bf16" if dtype == "bfloat16" else "jax_f32"
            key = (row["variant"], jax_mode)
            if key not in flops_by_dtype:
                flops_by_dtype[key] = model_flops(bench, row["variant"], jax_mode,
                                                  tuple(result["patch"]), result["batch"])
            flops, program_flops = flops_by_dtype[key]
            cost = {"flops": flops, "program_flops": program_flops,
                    "bytes_accessed": row.get("cost", {}).get("bytes_accessed", 0.0)}
            bounds = roofline(cost, peaks, dtype, row["median_ms"])
            if not cost["bytes_accessed"]:  # PyTorch rows: XLA's byte count does not apply
                bounds["memory_bound_ms"] = None
            rows.append({"variant": row["variant"], "mode": row["mode"], "median_ms": row["median_ms"],
                         **cost, **bounds})
            memory = bounds["memory_bound_ms"]
            print(f"| {os.path.basename(path)} | {row['mode']} | {row['median_ms']:.1f} | "
                  f"{cost['flops'] / 1e12:.2f} | {bounds['compute_bound_ms']:.1f} | "
                  f"{'' if memory is None else f'{memory:.1f}'} | {bounds['measured_over_bound']:.1f} |")
        name = "roofline_" + os.path.splitext(os.path.basename(path))[0].removeprefix("bench_train_step_")
        write_result(name, {"source": os.path.basename(path), "device_peaks": peaks,
                            "environment": result.get("environment"), "rows": rows})


if __name__ == "__main__":
    main()
