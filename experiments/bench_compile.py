"""First-train-step time of a stage config, cold and warm, under several XLA settings (issue 21).

Each variant runs twice, each time in a fresh process: cold (an empty persistent compilation
cache) and warm (the cache the cold process filled). A process builds the config's model,
optimiser and train step as `train_and_evaluate` does, as one program (on GPUs `train` runs it
as two since session 11: `experiments/bench_split_step.py` and `bench_first_step` measure that),
runs the first step on random data of the config's patch and batch, then times `--steps` more steps (so a variant that
compiles faster but runs slower shows it). The `shipped_autotune` variant loads the autotuning
results the `default` variant's cold process dumped (`--xla_gpu_load_autotune_results_from`),
with an empty compilation cache: what shipping autotuning results per GPU model would give;
`packaged_autotune` loads the results `livseg_jax/autotune/` ships, as `train` does.

    python -m experiments.bench_compile --config configs/liver.py:paper --tag h200 \
        [--variants default,shipped_autotune,packaged_autotune,autotune_level_0,executables] [--steps 10]
    # where the step's compile goes (XLA's passes, autotuning), from a profiler trace of it:
    python -m experiments.bench_compile --config configs/liver.py:paper --variants compile_trace --tag h200
    # variants combine with "+": --variants default,shipped_autotune+init_on_cpu
    # the gradients program of `train.step_programs=2` alone (a cold GPU run's critical path), traced:
    python -m experiments.bench_compile --variants packaged_autotune+gradients_only+compile_trace --cold-only
    python -m experiments.bench_compile --config configs/liver.py --patch 16,32,32 --tag cpu  # smoke

Writes experiments/results/bench_compile_<tag>.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import tempfile
import time

from experiments.bench_common import (
    REPO,
    environment,
    print_result,
    run_child,
    stage_step_parts,
    stage_train_step,
    write_result,
)
from livseg_jax.xla_flags import apply_model_xla_flags, autotune_xla_flags

# name -> XLA flags added to the environment's; `shipped_autotune` is filled in at run time.
# ENV: environment variables a variant sets (JAX reads its configuration from them too).
ENV = {"threefry_kernel": {"JAX_THREEFRY_GPU_KERNEL_LOWERING": "true"},
       "xla_init_lowering": {"BENCH_COMPILE_INIT_LOWERING": "xla"},
       "init_on_cpu": {"BENCH_COMPILE_INIT_ON": "cpu"},
       "compile_trace": {"BENCH_COMPILE_TRACE": "1"},
       "gradients_only": {"BENCH_COMPILE_PROGRAM": "gradients"}}
VARIANTS = {
    "default": "",
    "shipped_autotune": None,
    "packaged_autotune": None,  # the results livseg_jax/autotune/ ships for these versions, as `train` loads them
    "autotune_level_2": "--xla_gpu_autotune_level=2",  # no correctness check of the candidates
    "autotune_level_1": "--xla_gpu_autotune_level=1",  # no buffer initialisation either
    "autotune_level_0": "--xla_gpu_autotune_level=0",  # no autotuning: XLA's heuristics pick the kernels
    "executables": "",  # also a third process loading the programs the cold one serialised
    "threefry_kernel": "",  # JAX lowers the initialisers' threefry hashing to one GPU kernel each (ENV)
    "xla_init_lowering": "",  # the initialisation's threefry as unrolled HLO, as train did before (ENV)
    "fusion_autotune_cache": None,  # cold, then cold again with only the autotuning cache filled
    "autotuner_cache": None,  # the same with --xla_gpu_experimental_autotuner_cache_dir
    "init_on_cpu": "",  # the initialisation compiled for and run on the host CPU, then copied (ENV)
    "compile_trace": "",  # the step's compile under jax.profiler: its time by XLA phase (ENV), cold only
    # instead of the step, only the gradients program of `train.step_programs=2` (ENV): the compile on
    # the cold first step's critical path since session 11 (the update compiles beside it)
    "gradients_only": "",
    "compile_parallelism_16": "--xla_gpu_force_compilation_parallelism=16",  # LLVM modules on 16 threads
    # Triton GEMM fusions off (cuBLAS runs the dots): the compile trace showed ~4,500 candidate
    # modules compiled through MLIR during autotuning, probably Triton's, most of the autotuning
    # time (docs/benchmarks.md)
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    # session 11, for the compile's remaining ~40 s with nothing left to autotune:
    "llvm_cheap": "--xla_llvm_disable_expensive_passes=true",  # LLVM's costliest optimisation passes off
    # PTX to CUBIN in process, not through ptxas; jax 0.11.2's XLA rejects it ("Unknown flag", session 11)
    "nvptxcompiler": "--xla_gpu_enable_libnvptxcompiler=true",
    "no_lhs": "--xla_gpu_enable_latency_hiding_scheduler=false",  # one GPU has no collectives to hide
}
TRACE_TOP = 40  # event names kept in a compile trace's summary


def variant_settings(name: str, autotune_file: pathlib.Path) -> tuple[str, dict[str, str], str | None]:
    """Returns (XLA flags, environment, error) of a variant; `a+b` combines variants a and b."""
    flags, env = [], {}
    for part in name.split("+"):
        if part == "default":
            flags.append(f"--xla_gpu_dump_autotune_results_to={autotune_file}")
        elif part == "fusion_autotune_cache":  # XLA's per-fusion autotuning cache, kept across processes
            flags.append(f"--xla_gpu_per_fusion_autotune_cache_dir={autotune_file.parent / 'fusion_autotune'}")
        elif part == "autotuner_cache":  # the newer autotuner's cache (the "config-assigner" pass), kept.
            # Not an XLA_FLAGS flag in jax 0.11.2 ("Unknown flag"): a compile option of the step instead.
            env["BENCH_COMPILE_OPTIONS"] = json.dumps(
                {"xla_gpu_experimental_autotuner_cache_dir": str(autotune_file.parent / "autotuner_cache")})
        elif part == "packaged_autotune":
            flag, note = autotune_xla_flags("shipped")
            if not flag:
                return "", {}, note or "the package ships no autotuning results for this machine's versions"
            flags.append(flag)
        elif part == "shipped_autotune":
            if not autotune_file.exists():
                return "", {}, "needs the default variant first (its dumped results)"
            flags.append(f"--xla_gpu_load_autotune_results_from={autotune_file}")
        else:
            flags.append(VARIANTS[part])
        env.update(ENV.get(part, {}))
    return " ".join(f for f in flags if f), env, None


def self_times(events: list[dict], top: int = TRACE_TOP) -> list[dict]:
    """Returns the `top` event names by self time (duration less that of the events nested in them on
    the same thread), each with its total (inclusive) time and count, from a Chrome trace's events."""
    by_thread: dict = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    totals: dict[str, dict] = {}
    for thread in by_thread.values():
        thread.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))  # parents before their children
        stack: list[tuple[float, dict]] = []  # (end, row of the open event)
        for e in thread:
            start, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= start:
                stack.pop()
            row = totals.setdefault(e["name"], {"name": e["name"], "self_s": 0.0, "total_s": 0.0, "count": 0})
            row["self_s"] += dur / 1e6
            row["total_s"] += dur / 1e6
            row["count"] += 1
            if stack:
                stack[-1][1]["self_s"] -= dur / 1e6
            stack.append((start + dur, row))
    ordered = sorted(totals.values(), key=lambda r: -r["self_s"])[:top]
    return [{**r, "self_s": round(r["self_s"], 3), "total_s": round(r["total_s"], 3)} for r in ordered]


def first_step(config_arg: str, patch: str, steps: int, cache_dir: str, executables: str = "",
               init_only: bool = False) -> dict:
    """Returns the first-step time of one stage config in this process, phase by phase, and the steady step.

    Phases: the backend (devices, mesh), then for the initialisation and the train step each
    trace, lower, compile (or load from the persistent cache) and the first run. `executables`
    "store" also serialises the compiled programs into `cache_dir`/executables.pkl
    (`jax.experimental.serialize_executable`); "load" loads them from there instead of tracing,
    lowering and compiling: what an executable cache keyed by everything the programs depend on
    would give on a restart. `init_only` stops after the initialisation's first run.
    """
    import pickle

    import jax
    import numpy as np
    from jax.experimental import serialize_executable

    from livseg_jax.compilation_cache import enable_compilation_cache
    from livseg_jax.study.spec import load_config_file
    from livseg_jax.training.state import init_lowering, jit_create_train_state
    from livseg_jax.training.step import jit_train_step, replicated

    phases: dict[str, float] = {}
    compile_profile: list[dict] = []
    gradients_only = os.environ.get("BENCH_COMPILE_PROGRAM") == "gradients"  # the `gradients_only` variant
    tick = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        phases[name] = round(now - tick, 3)
        tick = now

    path, _, arg = config_arg.partition(":")
    config = load_config_file(REPO / path, arg)
    # The XLA flags `train` adds for the config's computation forms (NHWC convolutions on GPUs) and
    # its own `train.xla_flags`, before anything starts a backend. The variant's flags, already in
    # the environment, win. Before session 10 this script did not set them: its GPU programs'
    # convolutions differed from train's.
    apply_model_xla_flags([config.model], config.train.get("xla_flags", ""))
    enable_compilation_cache(pathlib.Path(cache_dir))
    shape, spe, model, optimizer, mesh, arrays = stage_step_parts(config, patch)
    batch = int(config.data.batch_size)
    jax.block_until_ready(arrays)
    phase("backend")
    stored = pathlib.Path(cache_dir) / "executables.pkl"
    if executables == "load":
        blobs = pickle.loads(stored.read_bytes())
        init_c, step_c = (serialize_executable.deserialize_and_load(*blobs[k]) for k in ("init", "step"))
        phase("load_executables")
        state = init_c()
        jax.block_until_ready(state)
        phase("init_run")
    else:
        on_cpu = os.environ.get("BENCH_COMPILE_INIT_ON") == "cpu"
        init_sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]) if on_cpu else replicated(mesh)
        init = jit_create_train_state(model, optimizer, 0, init_sharding)  # as train compiles it
        # as train lowers it (the threefry kernel on GPUs), unless BENCH_COMPILE_INIT_LOWERING=xla
        scope = contextlib.nullcontext() if os.environ.get("BENCH_COMPILE_INIT_LOWERING") == "xla" \
            else init_lowering()
        with scope:
            traced = init.trace()
            phase("init_trace")
            lowered = traced.lower()
            phase("init_lower")
            init_c = lowered.compile()
            phase("init_compile")
        state = init_c()
        jax.block_until_ready(state)
        phase("init_run")
        if on_cpu:
            state = jax.block_until_ready(jax.device_put(state, replicated(mesh)))
            phase("init_to_device")
        if init_only:  # with a digest of the state's bytes: variants must initialise identically
            import hashlib

            digest = hashlib.sha256()
            for leaf in jax.tree.leaves(jax.device_get(state)):
                digest.update(np.asarray(leaf).tobytes())  # the state's key is a raw uint32 array
            return {"first_step_s": None, "init_s": round(sum(phases.values()), 3), "phases_s": phases,
                    "median_step_ms": None, "state_sha256": digest.hexdigest()}
        step = jit_train_step(stage_train_step(config, model, optimizer, mesh), mesh,
                              programs=2 if gradients_only else 1)
        if gradients_only:  # the first of the two programs (training/step_programs.py)
            step = step.programs[0]
        traced = step.trace(state, arrays)
        phase("step_trace")
        lowered = traced.lower()
        phase("step_lower")
        options = json.loads(os.environ.get("BENCH_COMPILE_OPTIONS", "{}")) or None
        if os.environ.get("BENCH_COMPILE_TRACE"):  # XLA's compiler passes are annotated for the profiler
            from experiments.profile_train_step import read_trace

            trace_dir = pathlib.Path(cache_dir) / "compile_trace"
            with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                tick = time.perf_counter()  # starting the profiler is not part of the compile
                step_c = lowered.compile(compiler_options=options)
                phase("step_compile")
            compile_profile = self_times(read_trace(trace_dir))
            tick = time.perf_counter()  # writing and reading the trace are not part of the first step
        else:
            step_c = lowered.compile(compiler_options=options)
            phase("step_compile")
        if executables == "store":
            blobs = {"init": serialize_executable.serialize(init_c), "step": serialize_executable.serialize(step_c)}
            stored.write_bytes(pickle.dumps(blobs))
            tick = time.perf_counter()  # storing is not part of the first step

    def run_step(state):  # the gradients program leaves the state as it is: (grads, aux), aux the metrics
        out, metrics = step_c(state, arrays)
        return (state if gradients_only else out), metrics

    state, metrics = run_step(state)
    jax.block_until_ready(metrics)
    phase("step_first_run")
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = run_step(state)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"first_step_s": round(sum(phases.values()), 3), "phases_s": phases,
            "median_step_ms": times[len(times) // 2] if times else None,
            "loss": float(metrics["loss"]), "patch": list(shape), "batch": batch,
            "program": "gradients" if gradients_only else "train_step",
            **({"compile_profile": compile_profile} if compile_profile else {})}


def run_process(args, flags: str, cache_dir: str, executables: str = "", extra_env: dict | None = None) -> dict:
    """Runs one measuring child with `flags` added to XLA_FLAGS; returns its result row."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
               **(extra_env or {}))
    child_args = ["--child", "--config", args.config, "--patch", args.patch, "--steps", str(args.steps),
                  "--cache", cache_dir]
    if executables:
        child_args += ["--executables", executables]
    if args.init_only:
        child_args += ["--init-only"]
    return {"xla_flags_added": flags, **run_child("experiments.bench_compile", child_args, env=env)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/liver.py:paper")
    parser.add_argument("--patch", default="", help="D,H,W (default: the config's patch)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="default,shipped_autotune,autotune_level_2")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--init-only", action="store_true", help="time the initialisation only")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm processes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    parser.add_argument("--executables", default="", choices=("", "store", "load"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print_result(first_step(args.config, args.patch, args.steps, args.cache, args.executables, args.init_only))
        return
    names = args.variants.split(",")
    unknown = [p for n in names for p in n.split("+") if p not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_compile_"))
    autotune_file = work / "autotune.textproto"
    rows = []
    for name in names:
        flags, env, error = variant_settings(name, autotune_file)
        if error:
            rows.append({"variant": name, "error": error})
            continue
        cache = str(work / f"cache_{name}")
        # executables: cold stores the programs, warm uses the persistent cache, warm_executables loads them
        phases = {"cold": "store", "warm": "", "warm_executables": "load"} if "executables" in name.split("+") \
            else {"cold": "", "warm": ""}
        if {"fusion_autotune_cache", "autotuner_cache"} & set(name.split("+")):  # compilation cache empty again
            phases = {"cold": "", "cold_autotune_cached": ""}
        if "compile_trace" in name.split("+") or args.cold_only:  # a warm start compiles nothing
            phases = {"cold": ""}
        for phase, executables in phases.items():
            if phase == "cold_autotune_cached":
                cache = str(work / f"cache_{name}_second")
            row = {"variant": name, "phase": phase, **run_process(args, flags, cache, executables, env)}
            rows.append(row)
            print(f"{name:18s} {phase}: first step {row.get('first_step_s') or float('nan'):7.1f} s, "
                  f"state {row.get('state_sha256', '')[:12]} "
                  f"init {row.get('init_s') or float('nan'):6.1f} s, "
                  f"then {row.get('median_step_ms') or float('nan'):7.1f} ms/step {row.get('error', '')[:200]}\n"
                  f"    phases {row.get('phases_s')}", flush=True)
            for event in row.get("compile_profile", [])[:25]:
                print(f"    {event['self_s']:8.2f} s self {event['total_s']:8.2f} s total {event['count']:6d}x "
                      f"{event['name'][:90]}", flush=True)
            write_result(f"bench_compile_{args.tag}", {"benchmark": "compile", "config": args.config,
                                                       "environment": environment(), "rows": rows})
    print("| variant | phase | initialisation (s) | first step (s) | step (ms) |\n|---|---|---:|---:|---:|")
    for row in rows:
        init_s = row.get("init_s") or sum(v for k, v in (row.get("phases_s") or {}).items()
                                          if k == "backend" or k.startswith("init"))
        print(f"| {row['variant']} | {row.get('phase', '')} | {init_s or float('nan'):.1f}"
              f" | {row.get('first_step_s') or float('nan'):.1f} | {row.get('median_step_ms') or float('nan'):.1f} |")


if __name__ == "__main__":
    main()
