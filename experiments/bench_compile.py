"""First-train-step time of a stage config, cold and warm, under several XLA settings (issue 21).

Each variant runs twice, each time in a fresh process: cold (an empty persistent compilation
cache) and warm (the cache the cold process filled). A process builds the config's model,
optimiser and train step exactly as `train_and_evaluate` does, runs the first step on random
data of the config's patch and batch, then times `--steps` more steps (so a variant that
compiles faster but runs slower shows it). The `shipped_autotune` variant loads the autotuning
results the `default` variant's cold process dumped (`--xla_gpu_load_autotune_results_from`),
with an empty compilation cache: what shipping autotuning results per GPU model would give.

    python -m experiments.bench_compile --config configs/liver.py:paper --tag h200 \
        [--variants default,shipped_autotune,autotune_level_2] [--steps 10]
    python -m experiments.bench_compile --config configs/liver.py --patch 16,32,32 --tag cpu  # smoke

Writes experiments/results/bench_compile_<tag>.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from experiments.bench_common import REPO, RESULT_PREFIX, environment, print_result, write_result

# name -> XLA flags added to the environment's; `shipped_autotune` is filled in at run time.
VARIANTS = {
    "default": "",
    "shipped_autotune": None,
    "autotune_level_2": "--xla_gpu_autotune_level=2",  # no correctness check of the candidates
    "autotune_level_1": "--xla_gpu_autotune_level=1",  # no buffer initialisation either
}


def first_step(config_arg: str, patch: str, steps: int, cache_dir: str) -> dict:
    """Returns the first-step and steady-step times of one stage config in this process."""
    import jax
    import numpy as np

    from livseg_jax.compilation_cache import enable_compilation_cache
    from livseg_jax.data.augment_device import device_augment_settings
    from livseg_jax.models import build_model
    from livseg_jax.study.spec import load_config_file
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import create_train_state
    from livseg_jax.training.step import jit_train_step, make_mesh, make_train_step, replicated

    t0 = time.perf_counter()
    enable_compilation_cache(pathlib.Path(cache_dir))
    path, _, arg = config_arg.partition(":")
    config = load_config_file(REPO / path, arg)
    shape = tuple(int(v) for v in patch.split(",")) if patch else tuple(config.data.patch_size)
    spe = int(config.train.steps_per_epoch)
    model = build_model(config.model, deploy=False)
    optimizer = make_optimizer(config.optim, spe)
    mesh = make_mesh(jax.devices()[:1])
    state = jax.jit(lambda: create_train_state(model, optimizer, shape, 0), out_shardings=replicated(mesh))()
    step = jit_train_step(make_train_step(model, optimizer, config.loss, spe, device_augment_settings(config.data),
                                          config.train.get("batch_norm_stats", "global"), mesh), mesh)
    rng = np.random.default_rng(0)
    batch = int(config.data.batch_size)
    arrays = {"image": jax.device_put(rng.normal(size=(batch, *shape, 1)).astype(np.float32)),
              "label": jax.device_put((rng.random((batch, *shape)) < 0.1).astype(np.int32))}
    state, metrics = step(state, arrays)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, arrays)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"first_step_s": first_s, "median_step_ms": times[len(times) // 2] if times else None,
            "loss": float(metrics["loss"]), "patch": list(shape), "batch": batch}


def run_process(args, flags: str, cache_dir: str) -> dict:
    """Runs one measuring child with `flags` added to XLA_FLAGS; returns its result row."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    cmd = [sys.executable, "-m", "experiments.bench_compile", "--child", "--config", args.config,
           "--patch", args.patch, "--steps", str(args.steps), "--cache", cache_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    row = {"xla_flags_added": flags, "process_wall_s": time.perf_counter() - t0}
    if proc.returncode or not found:
        row["error"] = (proc.stderr or proc.stdout)[-1500:]
    else:
        import json

        row.update(json.loads(found[-1][len(RESULT_PREFIX):]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/liver.py:paper")
    parser.add_argument("--patch", default="", help="D,H,W (default: the config's patch)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="default,shipped_autotune,autotune_level_2")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print_result(first_step(args.config, args.patch, args.steps, args.cache))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_compile_"))
    autotune_file = work / "autotune.textproto"
    rows = []
    for name in names:
        flags = VARIANTS[name]
        if name == "default":
            flags = f"--xla_gpu_dump_autotune_results_to={autotune_file}"
        elif name == "shipped_autotune":
            if not autotune_file.exists():
                rows.append({"variant": name, "error": "needs the default variant first (its dumped results)"})
                continue
            flags = f"--xla_gpu_load_autotune_results_from={autotune_file}"
        cache = str(work / f"cache_{name}")
        for phase in ("cold", "warm"):
            row = {"variant": name, "phase": phase, **run_process(args, flags, cache)}
            rows.append(row)
            print(f"{name:18s} {phase}: first step {row.get('first_step_s', float('nan')):7.1f} s, "
                  f"then {row.get('median_step_ms') or float('nan'):7.1f} ms/step {row.get('error', '')[:200]}",
                  flush=True)
            write_result(f"bench_compile_{args.tag}", {"benchmark": "compile", "config": args.config,
                                                       "environment": environment(), "rows": rows})
    print("| variant | cold first step (s) | warm first step (s) | step (ms) |\n|---|---:|---:|---:|")
    for name in names:
        cold = next((r for r in rows if r["variant"] == name and r.get("phase") == "cold"), {})
        warm = next((r for r in rows if r["variant"] == name and r.get("phase") == "warm"), {})
        print(f"| {name} | {cold.get('first_step_s', float('nan')):.1f} | {warm.get('first_step_s', float('nan')):.1f}"
              f" | {cold.get('median_step_ms') or float('nan'):.1f} |")


if __name__ == "__main__":
    main()
