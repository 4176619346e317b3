"""What writing the compiled train step to a cache costs, and what it costs the first step beside it.

A cold `train` writes each compiled program twice: JAX's persistent compilation cache serialises
and compresses it inside the compile (on the first step's critical path), and the compiled-program
cache (livseg_jax/training/executable_cache.py) serialises it again for the warm start. This
script builds the step as `train` does (the config's forms, XLA flags and shipped autotuning
results; no compilation cache), compiles it three times from three traces, then measures:

- `serialize_s`, `serialized_bytes`: `jax.experimental.serialize_executable` per program;
- `zlib_s`, `zstd_s`: compressing those bytes as JAX's cache does (zlib when neither Python's
  `compression.zstd` nor `zstandard` is installed; `zstd_s` is null without `zstandard`);
- `first_run_s`: the first step of each copy, in order: the first copy alone (it also pays the
  process's one-time costs: cuDNN and cuBLAS handles), the second while a thread serialises the
  first copy's programs (what session 12's `train` did: its store began with the compile's
  result), the third alone again.

    python -m experiments.bench_cache_write --config configs/liver.py:paper --tag h200
    python -m experiments.bench_cache_write --config configs/liver.py --patch 16,32,32 --tag cpu  # smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import threading
import time
import zlib

from experiments.bench_common import (
    REPO,
    apply_train_xla_flags,
    environment,
    stage_step_parts,
    stage_train_step,
    write_result,
)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3)


def measure(config_arg: str, patch: str) -> dict:
    import jax
    from jax.experimental import serialize_executable

    from livseg_jax.study.spec import load_config_file
    from livseg_jax.training.state import init_lowering, jit_create_train_state
    from livseg_jax.training.step import jit_train_step, replicated

    path, _, arg = config_arg.partition(":")
    config = load_config_file(REPO / path, arg)
    apply_train_xla_flags(config)
    shape, spe, model, optimizer, mesh, batch = stage_step_parts(config, patch)
    with init_lowering():
        state = jit_create_train_state(model, optimizer, 0, replicated(mesh))()
    jax.block_until_ready(state)
    step = stage_train_step(config, model, optimizer, mesh)
    programs = config.train.get("step_programs")

    def compile_copy(_):  # a fresh jit each: two traces, two compiles
        return timed(lambda: jit_train_step(step, mesh, False, programs).trace(state, batch).lower().compile())

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        copies, compile_s = zip(*pool.map(compile_copy, range(3)), strict=True)
    first = copies[0]
    parts = list(getattr(first, "parts", (first,)))
    blobs, serialize_s = [], []
    for part in parts:
        blob, seconds = timed(lambda p=part: serialize_executable.serialize(p)[0])
        blobs.append(blob)
        serialize_s.append(seconds)
    row = {"patch": list(shape), "programs": len(parts), "compile_s": list(compile_s),
           "serialize_s": serialize_s, "serialized_bytes": [len(b) for b in blobs],
           "zlib_s": [timed(lambda b=b: zlib.compress(b))[1] for b in blobs]}
    try:
        import zstandard

        row["zstd_s"] = [timed(lambda b=b: zstandard.ZstdCompressor().compress(b))[1] for b in blobs]
    except ImportError:
        row["zstd_s"] = None

    def first_run(compiled):
        def run():
            _, metrics = compiled(state, batch)
            return jax.block_until_ready(metrics)
        return timed(run)[1]

    alone = first_run(copies[0])
    storing = threading.Thread(target=lambda: [serialize_executable.serialize(p) for p in parts])
    storing.start()
    beside = first_run(copies[1])
    storing.join()
    row["first_run_s"] = {"alone": alone, "beside_store": beside, "alone_again": first_run(copies[2])}
    row["second_run_s"] = first_run(copies[2])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/liver.py:paper")
    parser.add_argument("--patch", default="", help="D,H,W in place of the config's patch")
    parser.add_argument("--tag", default="local")
    args = parser.parse_args()
    row = measure(args.config, args.patch)
    print(row, flush=True)
    write_result(f"bench_cache_write_{args.tag}", {"benchmark": "cache_write", "config": args.config,
                                                   "environment": environment(), "rows": [row]})


if __name__ == "__main__":
    main()
